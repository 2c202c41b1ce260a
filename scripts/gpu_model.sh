#!/usr/bin/env bash
# The default model's real weights on a GPU machine that cannot reach PyPI (the device tool's).
#
# The GGUF (491,400,064 bytes) is larger than what one device call carries (64 MiB with the
# working tree), but files written outside the working tree there (/root) stay between the
# calls of one warm lease (a call must start within ~30 s of the previous one ending). So:
#
#   here, once:     bash scripts/gpu_model.sh split          # .gpu/part_00 .. part_07 + .whl/gguf
#   device call k:  bash scripts/gpu_model.sh add .gpu/part_0k      (carry [".gpu/part_0k"])
#                   the first call also carries ".whl" and runs `bash scripts/gpu_model.sh wheel`
#   last call:      bash scripts/gpu_model.sh finish && export PYTHONPATH=/root/site:.
#                   -> /root/longctx-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, sha256 checked
#
# Eight calls of ~60 MiB each, back to back; `status` on the device side says how far it got.
# Benchmarks then take --model /root/longctx-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
SIZE=491400064
DEST=${LONGCTX_GPU_MODEL_DIR:-/root/longctx-model}
PIECE=60M  # 8 pieces; each call's tree (~4 MB) + one piece stays under 64 MiB

case "${1:-}" in
  split)  # here: pieces of the verified local copy, and the gguf wheel the GPU image lacks
    src=${2:-$HOME/.cache/longctx/$NAME}
    [ "$(stat -c %s "$src")" = "$SIZE" ] || { echo "gpu_model: $src is not $SIZE bytes" >&2; exit 1; }
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu && split -b "$PIECE" -d -a 2 "$src" .gpu/part_
    ver=$(python3 -c "import gguf, importlib.metadata as m; print(m.version('gguf'))" 2>/dev/null \
          || .venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform any -d .whl "gguf==$ver"
    ls -l .gpu .whl
    ;;
  wheel)  # device: the gguf reader, installed outside the tree so later calls keep it
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /root/site .whl/gguf-*.whl
    ;;
  add)  # device: append one piece (in order) to the partial file
    mkdir -p "$DEST"
    cat "$2" >> "$DEST/$NAME.part"
    echo "gpu_model: $(stat -c %s "$DEST/$NAME.part") of $SIZE bytes"
    ;;
  finish)  # device: check size and hash, then put the file in place
    part="$DEST/$NAME.part"
    [ -f "$DEST/$NAME" ] && [ ! -f "$part" ] && { echo "$DEST/$NAME"; exit 0; }
    got=$(stat -c %s "$part")
    [ "$got" = "$SIZE" ] || { echo "gpu_model: $got of $SIZE bytes: a piece is missing" >&2; exit 1; }
    echo "$SHA256  $part" | sha256sum -c --quiet - \
      || { echo "gpu_model: sha256 mismatch: start again (rm $part)" >&2; exit 1; }
    mv "$part" "$DEST/$NAME"
    echo "$DEST/$NAME"
    ;;
  status)
    ls -l "$DEST" 2>/dev/null || echo "gpu_model: nothing in $DEST yet"
    ;;
  *)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
