"""Record the vertical-slash pattern the default model (Qwen2.5-Coder-0.5B) actually selects at
its longest CPU length, for the GPU speed bench's third pattern (issue "Sparse prefill").

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/capture_pattern_cpu.py \
      --text benchmarks/results/sparse_cpu/calibration_text.txt \
      --out benchmarks/results/sparse_cpu/pattern_16k

A 16K-token prompt of real text (the calibration text: this repository's Python sources) is
prefilled in chunks of 4096 at float32; the chunks before the last stay dense and only the
last one goes sparse (threshold 12288), so its estimation sees the whole 16K context and what
it selects is the model's pattern at 16K. Budgets: the start budgets of the CPU accuracy run
(125 vertical / 762 slash per head: MInference's default 1000 / 6096 at the same share of the
prompt, benchmarks/eval_sparse_cpu.sh). Writes pattern.safetensors (vertical [L, H, 125] key
columns, slash [L, H, 762] distances, int32, -1 = none) and pattern.md (per layer: share of
slashes within 1/16 of the context and of columns in the first 1%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, ".")
from longctx.entrypoints.llm import LLM  # noqa: E402
from longctx.layers.attention.sparse_backend import SparseAttentionBackend  # noqa: E402
from longctx.sampling_params import SamplingParams  # noqa: E402
from longctx.sparse.config import SparseConfig  # noqa: E402
from longctx.sparse.estimate import NO_COLUMN, NO_SLASH  # noqa: E402

LENGTH, CHUNK = 16384, 4096
VERTICAL, SLASH = 125, 762


class Capture:
    """Keeps the selections of the last sparse segment of every layer."""

    def __init__(self, num_layers: int) -> None:
        self.vertical: list[torch.Tensor | None] = [None] * num_layers
        self.slash: list[torch.Tensor | None] = [None] * num_layers
        self.q_end = 0

    def selected(self, layer, segment, parts, sel) -> None:
        (part,), (s,) = parts, sel  # no DCA at 16K: one causal part
        assert part.causal and part.key_lo == 0
        self.vertical[layer] = torch.where(s.vertical == NO_COLUMN, -1, s.vertical).int()
        self.slash[layer] = torch.where(s.slash == NO_SLASH, -1, s.slash).int()
        self.q_end = segment.q_end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="a text file (tokens repeated to 16K)")
    p.add_argument("--out", required=True, help="directory for pattern.safetensors / .md")
    p.add_argument("--model", default=None, help="default: the default model")
    args = p.parse_args()
    t0 = time.time()
    llm = LLM(args.model, "float32", sparse=False, max_num_batched_tokens=CHUNK)
    cfg = llm.engine.model_config
    ids = llm.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
    ids = (ids * -(-LENGTH // len(ids)))[:LENGTH]
    sparse = SparseConfig(default_vertical=VERTICAL, default_slash=SLASH, threshold=LENGTH - CHUNK)
    capture = Capture(cfg.num_layers)
    runner = llm.engine.runner
    runner.backend = SparseAttentionBackend(cfg, sparse, runner.backend, observer=capture)
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    if any(v is None for v in capture.vertical) or capture.q_end != LENGTH:
        raise SystemExit("the last chunk did not go sparse in every layer")
    vertical, slash = torch.stack(capture.vertical), torch.stack(capture.slash)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(length=str(LENGTH), vertical=str(VERTICAL), slash=str(SLASH), text=args.text)
    save_file({"vertical": vertical, "slash": slash}, out / "pattern.safetensors", metadata=meta)
    lines = [
        f"# Pattern the default model selects at {LENGTH // 1024}K (last {CHUNK}-token chunk, "
        "float32, CPU)",
        "",
        f"Text: {args.text}; budgets {VERTICAL} vertical / {SLASH} slash per head; "
        f"{cfg.num_layers} layers x {cfg.num_heads} heads; {time.time() - t0:.0f} s.",
        f"Per layer, over heads: share of selected slashes at distance < {LENGTH // 16} (1/16 "
        f"of the context) and of selected columns among the first {LENGTH // 100} keys (1%).",
        "",
        f"| layer | slash < {LENGTH // 16} | columns < {LENGTH // 100} |",
        "|---|---|---|",
    ]
    for layer in range(cfg.num_layers):
        s, v = slash[layer], vertical[layer]
        near = float(((s >= 0) & (s < LENGTH // 16)).sum() / (s >= 0).sum().clamp(min=1))
        early = float(((v >= 0) & (v < LENGTH // 100)).sum() / (v >= 0).sum().clamp(min=1))
        lines.append(f"| {layer} | {near:.2f} | {early:.2f} |")
    (out / "pattern.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(out / "pattern.safetensors")


if __name__ == "__main__":
    main()
