"""End-to-end sparse prefill on one GPU (issue "Sparse prefill that pays off end to end at 1M").

The engine as a user runs it (`LLM.generate` on passkey / needle-in-a-haystack prompts): time
to first token of dense and sparse prefill on the real default model (Qwen2.5-Coder-0.5B GGUF,
32K-trained) with DCA (chunk 32768 / local 8192, YaRN from 32768), and where the time goes.

  PYTHONPATH=/root/site:. python3 benchmarks/bench_e2e_sparse_gpu.py --part short \
      --model /root/longctx-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out $OUT
  ... --part sparse1m --record /root/patterns.pt   # 1M sparse accuracy, breakdown, patterns
  ... --part dense1m                                # 1M dense accuracy (the anchor)
  ... --part 7b --replay /root/patterns.pt          # 7B-1M shape, random weights
  PYTHONPATH=. python benchmarks/bench_e2e_sparse_gpu.py --tiny                # CPU smoke test

(scripts/gpu_model.sh carries the GGUF to the GPU machine.) Parts:

  short     TTFT dense vs sparse at 128K / 256K / 512K (one passkey case each, depth 0.5; the
            answer is checked too), and 1M dense vs sparse on the same case (the headline
            ratio, both in this call)
  sparse1m  passkey and NIAH at 1M (--depths), sparse; one more sparse 1M case with the phase
            timer on (device and host ms per phase: linear layers, dense attention of the
            first chunk, KV write, key gather, query rotation, estimation, selection, index
            conversion, kernel -- the DCA parts merge inside the kernel's online softmax, so
            there is no separate merge), with a count of host synchronisations
            (torch.cuda.set_sync_debug_mode); with --record, one more sparse case whose
            per-layer, per-segment selections are saved for the 7B part
  dense1m   passkey and NIAH at 1M, dense (the accuracy anchor of sparse1m)
  profile   the default model's architecture with random weights (no checkpoint needed): a
            sparse 1M prompt with the phase timer, the same untimed, and 256K in both slash
            units (random attention spreads the diagonals: the diagonal unit goes near dense)
  7b        the Qwen2.5-7B-Instruct-1M architecture with random weights, one 1M-token prompt,
            sparse. Random weights give near-random attention (DESIGN.md section 5), so with
            --replay the kernel is driven by the real model's selections at 1M (recorded by
            sparse1m; 7B layer l takes 0.5B layer l * 24 // 28, head h takes head h mod 14),
            while the estimation and selection still run on the 7B's data and are timed. The
            replay needs the same DCA geometry as the recording (chunk 32768 / local 8192);
            a second row runs the 7B-1M's own DCA config (chunk 262144) with the engine's own
            selection on random weights (whose cost the tile budget bounds all the same).

Results: e2e_sparse_gpu_<part>.{json,md} under --out (and benchmarks/results/ with --results).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, DCAConfig, SamplingParams  # noqa: E402
from longctx.eval import niah, passkey  # noqa: E402
from longctx.eval.haystack import build_case  # noqa: E402
from longctx.eval.runner import run_batch  # noqa: E402
from longctx.profiling import PhaseTimer  # noqa: E402
from longctx.sparse.config import SparseConfig  # noqa: E402
from longctx.sparse.estimate import PartSelection  # noqa: E402

K = 1024
DCA_05B = DCAConfig(chunk_size=32768, local_size=8192, original_max_position_embeddings=32768)
TARGET_SPEEDUP = 5.0
TARGET_7B_S = 45.0


# --- engines ---------------------------------------------------------------------------------


def make_llm(args, sparse: bool, dca: DCAConfig = DCA_05B) -> LLM:
    cfg = SparseConfig(source="default", threshold=args.threshold) if sparse else False
    # No prefix caching: the depths of one length share the haystack before the needle.
    return LLM(
        model=args.model, dca=dca, sparse=cfg, kv_cache_gib=args.kv_gib, enable_prefix_caching=False
    )


def sparse_prefill(llm: LLM):
    """The SparsePrefill of an LLM built with sparse prefill."""
    return llm.engine.runner.backend.prefill


def release(llm: LLM | None) -> None:
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- cases -----------------------------------------------------------------------------------


def case(task_module, llm: LLM, length: int, depth: float, chat: bool = True):
    task = task_module.make_task()
    return build_case(task, llm.tokenizer, length=length, depth=depth, sample=0, seed=0, chat=chat)


def run_case(llm: LLM, c, max_tokens: int = 12) -> dict:
    """One case alone: its prefill seconds (TTFT: the runner times from the batch's start to
    the end of the case's prefill) and whether the answer is right."""
    res = run_batch(llm, [c], max_tokens, progress=False)[0]
    return {
        "task": res.task,
        "tokens": res.prompt_tokens,
        "depth": res.depth,
        "ttft_s": res.seconds,
        "correct": res.correct,
        "expected": res.expected,
        "output": res.output.strip()[:40],
    }


def warm_up(llm: LLM, length: int) -> None:
    """Compile every kernel the timed runs use (first chunk dense, later chunks sparse)."""
    llm.generate([[13] * length], SamplingParams(max_tokens=2, temperature=0.0))


# --- the phase breakdown ---------------------------------------------------------------------


def time_linear_layers(model, timer: PhaseTimer) -> list:
    """Forward hooks that time the projections and the MLP of every layer as phases."""
    handles = []
    for layer in model.model.layers:
        for name, mod in (
            ("linear.qkv", layer.self_attn.qkv_proj),
            ("linear.o", layer.self_attn.o_proj),
            ("linear.mlp", layer.mlp),
        ):
            handles += _phase_hooks(mod, name, timer)
    return handles


def _phase_hooks(module, name: str, timer: PhaseTimer) -> list:
    box = {}

    def pre(_mod, _args):
        box["cm"] = timer.phase(name)
        box["cm"].__enter__()

    def post(_mod, _args, _out):
        box.pop("cm").__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def breakdown(llm: LLM, c) -> tuple[dict, list[dict]]:
    """One sparse case with every phase timed and host synchronisations counted."""
    timer = PhaseTimer(llm.engine.device)
    sparse_prefill(llm).timer = timer
    handles = time_linear_layers(llm.engine.runner.model, timer)
    syncs: collections.Counter = collections.Counter()
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        row = run_case(llm, c)
        wall = time.perf_counter() - t0
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    for h in handles:
        h.remove()
    sparse_prefill(llm).timer = None
    totals = timer.summary()
    phases = []
    timed_ms = 0.0
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1].device_ms):
        timed_ms += t.device_ms
        phases.append(
            {
                "phase": name,
                "calls": t.calls,
                "device_s": round(t.device_ms / 1e3, 3),
                "host_s": round(t.host_ms / 1e3, 3),
                "share_of_ttft": round(t.device_ms / 1e3 / row["ttft_s"], 4),
            }
        )
    phases.append(
        {
            "phase": "rest (norms, embedding, residuals, sampling, scheduling, device idle)",
            "calls": "",
            "device_s": round(row["ttft_s"] - timed_ms / 1e3, 3),
            "host_s": "",
            "share_of_ttft": round(1 - timed_ms / 1e3 / row["ttft_s"], 4),
        }
    )
    row = dict(row, run="breakdown (phase timer on)", wall_s=round(wall, 2))
    row["host_syncs"] = sum(syncs.values())
    row["sync_sites"] = ", ".join(f"{k} x{v}" for k, v in syncs.most_common(8))
    return row, phases


# --- selections: record (0.5B) and replay (7B) -----------------------------------------------


class PatternRecorder:
    """SelectionObserver: every (layer, segment) selection, on the host."""

    def __init__(self) -> None:
        self.patterns: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def selected(self, layer, segment, parts, sel) -> None:
        key = (layer, segment.q_start, segment.q_end)
        self.patterns[key] = [(s.vertical.int().cpu(), s.slash.cpu()) for s in sel]

    def save(self, path: str, num_layers: int, num_heads: int) -> None:
        meta = {"num_layers": num_layers, "num_heads": num_heads}
        torch.save({"meta": meta, "patterns": self.patterns}, path)


class PatternReplay:
    """SelectionOverride: the recorded selections of the same segment, layers and heads mapped
    onto this model's; a segment never recorded keeps its own selection (counted)."""

    def __init__(self, path: str, num_layers: int, num_heads: int, device) -> None:
        data = torch.load(path)
        self.src_layers, self.src_heads = data["meta"]["num_layers"], data["meta"]["num_heads"]
        self.num_layers = num_layers
        heads = torch.arange(num_heads) % self.src_heads
        self.patterns = {
            k: [(v[heads].to(device).long(), s[heads].to(device)) for v, s in parts]
            for k, parts in data["patterns"].items()
        }
        self.replayed = self.missing = 0

    def replace(self, layer, segment, parts, sel):
        src = layer * self.src_layers // self.num_layers
        rec = self.patterns.get((src, segment.q_start, segment.q_end))
        if rec is None or len(rec) != len(sel):
            self.missing += 1
            return sel
        self.replayed += 1
        return [PartSelection(v, s) for v, s in rec]


# --- parts -----------------------------------------------------------------------------------


def part_short(args, env) -> list[dict]:
    rows = []
    lengths = [int(x) * K for x in args.lengths.split(",")]
    for sparse in (False, True):
        llm = make_llm(args, sparse)
        warm_up(llm, args.warm)
        for length in lengths:
            r = run_case(llm, case(passkey, llm, length, 0.5))
            rows.append(dict(mode="sparse" if sparse else "dense", **r))
            print(rows[-1], flush=True)
        release(llm)
    by = {(r["mode"], r["tokens"]): r for r in rows}
    for length in sorted({r["tokens"] for r in rows}):
        d, s = by.get(("dense", length)), by.get(("sparse", length))
        if d and s:
            rows.append(
                {
                    "mode": "speedup",
                    "tokens": length,
                    "ttft_s": round(d["ttft_s"] / s["ttft_s"], 2),
                    "target": TARGET_SPEEDUP if length >= 1000 * K else "",
                }
            )
    return rows


def part_accuracy(args, sparse: bool) -> list[dict]:
    llm = make_llm(args, sparse)
    warm_up(llm, args.warm)
    rows = []
    length = args.long * K
    tasks = {"passkey": passkey, "niah": niah}
    for name in args.tasks.split(","):
        for depth in [float(x) for x in args.depths.split(",")]:
            r = run_case(llm, case(tasks[name], llm, length, depth))
            rows.append(dict(mode="sparse" if sparse else "dense", run="accuracy", **r))
            print(rows[-1], flush=True)
            args.flush(rows)  # a call cut short keeps the cases done
    phases: list[dict] = []
    if sparse:
        row, phases = breakdown(llm, case(passkey, llm, length, 0.5))
        rows.append(dict(mode="sparse", **row))
        print(rows[-1], flush=True)
        if args.record:
            rec = PatternRecorder()
            sparse_prefill(llm).observer = rec
            r = run_case(llm, case(passkey, llm, length, 0.5))
            sparse_prefill(llm).observer = None
            cfg = llm.engine.model_config
            rec.save(args.record, cfg.num_layers, cfg.num_heads)
            rows.append(dict(mode="sparse", run=f"recording -> {args.record}", **r))
    release(llm)
    args.phases = phases
    return rows


def part_7b(args) -> list[dict]:
    from longctx.loading import builtin_config
    from longctx.loading.checkpoint import Checkpoint

    cfg = builtin_config("qwen2.5-7b-instruct-1m") if not args.tiny else tiny_config()
    ckpt = Checkpoint(config=cfg, tokenizer=None, source="random", weights=None)
    length = args.long * K
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    rows = []
    runs = []
    if args.replay:
        runs.append(("replayed 0.5B selections, DCA chunk 32768", DCA_05B, args.replay))
    if "own" in args.runs.split(","):
        runs.append(("own selection (random weights), 7B-1M DCA config", cfg.dca, None))
    for label, dca, replay in runs:
        sparse = SparseConfig(source="default", threshold=args.threshold)
        llm = LLM(
            checkpoint=ckpt, dca=dca, sparse=sparse, kv_cache_gib=args.kv_gib_7b,
            device=args.device, enable_prefix_caching=False,
        )  # fmt: skip
        warm_up(llm, args.warm)
        pre = sparse_prefill(llm)
        if replay:
            pre.override = PatternReplay(replay, cfg.num_layers, cfg.num_heads, llm.engine.device)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        llm.generate([ids.tolist()], SamplingParams(max_tokens=1, temperature=0.0))
        ttft = time.perf_counter() - t0
        row = {"model": "7B-1M arch, random weights", "run": label, "tokens": length}
        row["ttft_s"] = round(ttft, 2)
        row["target_s"] = TARGET_7B_S
        if replay:
            row["segments_replayed"] = pre.override.replayed
            row["segments_own"] = pre.override.missing
        if torch.cuda.is_available():
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        rows.append(row)
        print(row, flush=True)
        release(llm)
    return rows


def config_05b():
    from longctx.config import ModelConfig

    return ModelConfig(
        architecture="qwen2", attention_bias=True, vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip


def part_profile(args) -> list[dict]:
    """Random weights of the default model's shape: where a sparse 1M prefill spends its time."""
    from longctx.loading.checkpoint import Checkpoint

    cfg = config_05b() if not args.tiny else tiny_config()
    ckpt = Checkpoint(config=cfg, tokenizer=None, source="random", weights=None)
    rows = []
    runs = [(args.long * K, "tile", True), (args.long * K, "tile", False)]
    runs += [(256 * K if not args.tiny else 2 * K, u, False) for u in ("tile", "diagonal")]
    for length, unit, timed in runs:
        sparse = SparseConfig(source="default", threshold=args.threshold, slash_unit=unit)
        llm = LLM(checkpoint=ckpt, dca=DCA_05B if not args.tiny else cfg.dca, sparse=sparse,
                  kv_cache_gib=args.kv_gib, device=args.device,
                  enable_prefix_caching=False)  # fmt: skip
        warm_up(llm, args.warm)
        ids = torch.randint(
            1, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(1)
        )
        c = _RandomCase(tuple(ids.tolist()))
        if timed:
            row, args.phases = breakdown(llm, c)
        else:
            row = run_case(llm, c, max_tokens=1)
        rows.append(dict(model="0.5B arch, random weights", unit=unit, **row))
        print(rows[-1], flush=True)
        release(llm)
    return rows


@dataclasses.dataclass(frozen=True)
class _RandomCase:
    """A random-token prompt in the NeedleCase shape run_batch takes (its answer is never right)."""

    prompt_token_ids: tuple[int, ...]
    task: str = "random"
    depth: float = 0.0
    sample: int = 0
    expected: str = "-"
    needle_depth: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt_token_ids)


def tiny_config():
    from longctx.config import ModelConfig

    return ModelConfig(
        architecture="qwen2", attention_bias=True, vocab_size=512, hidden_size=64,
        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=4096, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        dca=DCAConfig(chunk_size=2048, local_size=512, original_max_position_embeddings=2048),
    )  # fmt: skip


_SPARSE = (
    "sparse = the default budgets (1000 vertical / 6096 slash per head; slashes counted in "
    "kernel tiles, longctx/sparse/estimate.py 'Slash unit'), prefill chunks the engine's "
    "default (with sparse and DCA one DCA chunk: 24576 tokens here; dense 32768)."
)
_REAL = (
    "Real default model (Qwen2.5-Coder-0.5B-Instruct GGUF, 32K-trained), bf16, DCA chunk 32768 "
    "/ local 8192 with YaRN from 32768, chat template, greedy. " + _SPARSE + " ttft_s: the "
    "engine's prefill time of the case (LLM.generate, one case at a time, kernels compiled "
    "beforehand by a warm-up prompt). K = 1024 tokens (1000K = 1,024,000)."
)
_PHASES = (
    " Phases (breakdown run, phase timer on): device_s = CUDA-event time from a phase's first "
    "kernel to its last (device idle inside it included), host_s = host seconds spent queueing "
    "it; the DCA parts of a segment share the kernel's online softmax (no separate merge)."
)
NOTES = {
    "short": _REAL,
    "sparse1m": _REAL + _PHASES,
    "dense1m": _REAL,
    "profile": "The default model's architecture with random weights (random attention). "
    + _SPARSE
    + _PHASES,
    "7b": "Qwen2.5-7B-Instruct-1M architecture, random weights, bf16, one random 1M-token "
    "prompt, sparse. " + _SPARSE + " replayed: the kernel attends the selections the real "
    "0.5B model made at 1M (part sparse1m --record; 7B layer l <- 0.5B layer l*24//28, head "
    "h <- head h mod 14) while the 7B's own estimation and selection still run and are "
    "timed; the replay needs the recording's DCA geometry (chunk 32768 / local 8192). own: "
    "the 7B-1M's DCA config, the engine's own selection on random weights.",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    parts = ["short", "sparse1m", "dense1m", "profile", "7b"]
    ap.add_argument("--part", choices=parts, default="short")
    ap.add_argument("--model", default=None, help="GGUF / HF directory (default: the default)")
    ap.add_argument("--lengths", default="128,256,512,1000", help="in K tokens (part short)")
    ap.add_argument("--long", type=int, default=1000, help="K tokens of the 1M parts")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--tasks", default="passkey,niah", help="sparse1m / dense1m")
    ap.add_argument("--kv-gib", type=float, default=14.0)
    ap.add_argument("--kv-gib-7b", type=float, default=60.0)
    ap.add_argument("--warm", type=int, default=65536, help="warm-up prompt tokens")
    ap.add_argument("--record", default=None, help="save the 1M selections here (sparse1m)")
    ap.add_argument("--replay", default=None, help="selections to replay (part 7b)")
    ap.add_argument("--runs", default="own", help="part 7b: 'own' adds the 7B's own selection")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threshold", type=int, default=32768, help="sparse threshold (default)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", action="store_true", help="also write benchmarks/results/")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    if args.tiny:
        args.lengths, args.long, args.depths, args.warm = "2,3", 3, "0.5", 1024
        args.threshold = 1024
        args.kv_gib = args.kv_gib_7b = 0.25
    env = environment()
    t0 = time.perf_counter()
    args.phases = []
    name = f"e2e_sparse_gpu_{args.part}" + (f"_{args.tag}" if args.tag else "")
    dirs = [out_dir(args.out)] + ([Path("benchmarks/results")] if args.results else [])

    def flush(rows: list[dict]) -> None:
        wall = env | {"wall_s": round(time.perf_counter() - t0)}
        for d in dirs:
            write_results(d, name, wall, rows, NOTES[args.part], quiet=True)
            if args.phases:
                write_results(d, name + "_phases", wall, args.phases, NOTES[args.part], quiet=True)

    args.flush = flush
    if args.part == "short":
        rows = part_short(args, env)
    elif args.part in ("sparse1m", "dense1m"):
        rows = part_accuracy(args, sparse=args.part == "sparse1m")
    elif args.part == "profile":
        rows = part_profile(args)
    else:
        rows = part_7b(args)
    flush(rows)
    print((dirs[0] / f"{name}.md").read_text())
    if args.phases:
        print((dirs[0] / f"{name}_phases.md").read_text())


if __name__ == "__main__":
    main()
