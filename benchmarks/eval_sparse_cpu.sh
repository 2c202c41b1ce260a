#!/usr/bin/env bash
# Sparse-prefill accuracy on the CPU (issue "Sparse prefill"), default model (Qwen2.5-Coder-0.5B
# GGUF, 24 layers x 14 heads), float32, 16K tokens (the longest the 2-core machine runs in the
# time we have):
#   1. start budgets: MInference's default 1000 vertical / 6096 slash is sized for 128K+ prompts
#      (at 16K it keeps nearly every key); we scale it to the same share of a 16K prompt,
#      125 vertical / 762 slash per head, so that sparsity is real;
#   2. calibration on real text (this repository's Python sources, concatenated): per-head recall
#      before and after raising the budgets of heads under 0.95 (report + heatmap);
#   3. passkey at 16K: dense vs sparse (start budgets) vs sparse (refined budgets);
#   4. sparse inside DCA on real weights: passkey at 8K with DCA chunk 2048 / local 512 (the
#      setting of benchmarks/results/dca/passkey_8k_dca, dense there), budgets at the same
#      share of an 8K prompt (62 / 381), one budget over the DCA parts vs each part its own.
# Prefill chunks of 4096 tokens (2048 for 4); chunks go sparse once the cached length passes
# 4096 (2048).
#
#   nohup bash benchmarks/eval_sparse_cpu.sh > benchmarks/results/sparse_cpu/eval.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results/sparse_cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
DATA=$OUT/calibration_text.txt  # not committed: rebuilt from the sources of this commit
find longctx -name '*.py' | sort | xargs cat > "$DATA"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
for name, v, s in (("start_16k", 125, 762), ("start_8k", 62, 381)):
    layer = {str(h): ["vertical_and_slash", v, s, 0.0] for h in range(14)}
    json.dump([layer] * 24, open(f"{sys.argv[1]}/{name}.json", "w"), indent=1)
PY
SPARSE=(--sparse-threshold 4096 --max-num-batched-tokens 4096)
echo "=== $(date -u +%FT%TZ) calibrate"
.venv/bin/longctx calibrate --dtype float32 --data "$DATA" --lengths 16384 --recall 0.95 \
    --rounds 2 --step 2 --sparse-config "$OUT/start_16k.json" "${SPARSE[@]}" \
    --out "$OUT/refined_16k.json" --report-dir "$OUT/calibration" || echo "=== calibrate failed"
PASSKEY=(.venv/bin/longctx eval passkey --dtype float32 --seed 0 --resume --lengths 16384
    --depths 0.2,0.5,0.8 --samples 1)
for mode in dense start refined; do
    echo "=== $(date -u +%FT%TZ) passkey 16K $mode"
    case $mode in
        dense) flags=(--no-sparse) ;;
        start) flags=(--sparse-config "$OUT/start_16k.json" "${SPARSE[@]}") ;;
        refined) flags=(--sparse-config "$OUT/refined_16k.json" "${SPARSE[@]}") ;;
    esac
    "${PASSKEY[@]}" --out "$OUT/passkey_16k_$mode" "${flags[@]}" || echo "=== $mode failed"
done
DCA=(--lengths 8192 --depths 0.1,0.5,0.9 --samples 1 --dca-chunk-size 2048 --dca-local-size 512
    --sparse-config "$OUT/start_8k.json" --sparse-threshold 2048 --max-num-batched-tokens 2048)
for budget in shared per_part; do
    echo "=== $(date -u +%FT%TZ) passkey 8K DCA 2048/512 sparse, $budget budget"
    .venv/bin/longctx eval passkey --dtype float32 --seed 0 --resume "${DCA[@]}" \
        --sparse-dca-budget $budget --out "$OUT/passkey_8k_dca_sparse_$budget" \
        || echo "=== $budget failed"
done
echo "=== $(date -u +%FT%TZ) done"
