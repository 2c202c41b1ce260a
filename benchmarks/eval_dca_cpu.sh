#!/usr/bin/env bash
# Length-extrapolation evidence on the CPU (issue "Length extrapolation", items 4-5), default model
# (Qwen2.5-Coder-0.5B-Instruct GGUF, trained to 32K), float32, passkey retrieval, greedy:
#   (a) mechanism, 8K tokens: DCA chunk 2048 / local 512 against RoPE positions clamped at 2048;
#   (b) extrapolation, 64K tokens: DCA chunk 32768 / local 8192 against plain RoPE,
#       depth 0.5 first for both, then the other depths (--resume keeps what is done).
# Steps run one after another (one long job on a shared 2-core machine). Each writes
# results.json after every case and results.md + heatmap.png after every length, so a killed
# run leaves what it finished; rerunning the script resumes.
#
#   nohup bash benchmarks/eval_dca_cpu.sh > benchmarks/results/dca/eval_dca_cpu.log 2>&1 &
#   bash benchmarks/eval_dca_cpu.sh a      # only (a); "b" for only (b); "b1" / "b2": (b) at
#                                          # depth 0.5 / at the other depths
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results/dca
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LONGCTX=(.venv/bin/longctx eval passkey --dtype float32 --seed 0 --resume)
PART=${1:-ab}

step() {  # step NAME ARGS...: one evaluation into $OUT/NAME
    local name=$1
    shift
    echo "=== $(date -u +%FT%TZ) $name: $*"
    "${LONGCTX[@]}" --out "$OUT/$name" "$@" || echo "=== $name failed (exit $?)"
}

mkdir -p "$OUT"
if [[ $PART == *a* ]]; then
    step passkey_8k_dca --lengths 8192 --depths 0.1,0.5,0.9 --samples 3 \
        --dca-chunk-size 2048 --dca-local-size 512
    step passkey_8k_clamp2048 --lengths 8192 --depths 0.1,0.5,0.9 --samples 3 \
        --positions-clamp 2048
fi
DCA64=(--lengths 65536 --samples 1 --dca-chunk-size 32768 --dca-local-size 8192 --kv-cache-gib 6)
ROPE64=(--lengths 65536 --samples 1 --kv-cache-gib 6)
if [[ $PART == *b* && $PART != *b2* ]]; then  # depth 0.5, both
    step passkey_64k_dca "${DCA64[@]}" --depths 0.5
    step passkey_64k_rope "${ROPE64[@]}" --depths 0.5
fi
if [[ $PART == *b* && $PART != *b1* ]]; then  # the other depths (resumes)
    step passkey_64k_dca "${DCA64[@]}" --depths 0.1,0.5,0.9
    step passkey_64k_rope "${ROPE64[@]}" --depths 0.1,0.5,0.9
fi
echo "=== $(date -u +%FT%TZ) done"
