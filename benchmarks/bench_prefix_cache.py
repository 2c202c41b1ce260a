"""Prefix caching and saved KV (issue 13, parts 1-2), on whatever device it runs.

A long document (a passkey haystack when the model has a tokenizer, random ids otherwise) is
asked two questions. Measured, in one engine:

  1. doc + q1, cold cache: TTFT = the whole prefill (uncached)
  2. doc + q2: a follow-up on the cached document (TTFT, cached tokens)
  3. save_kv(doc): seconds to write its KV (the document is cached: the write alone)
  4. cache dropped, doc + q2 again, cold: the reference answer (greedy) and a second uncached TTFT
  5. cache dropped, load_kv(doc): seconds to read it back; then doc + q2 (TTFT after the load)
  6. (unless --no-server) two clients at once through the server's engine thread
     (longctx/server/engine_loop.py), doc + q1 and doc + q2 on the cached document: TTFT each

Answers of 2, 5 and 6 must equal the uncached ones (greedy, token ids). Saved files were just
written, so the load may read them from the OS page cache.

  PYTHONPATH=. python benchmarks/bench_prefix_cache.py --tokens 2048 --dca-chunk-size 1024 \
      --dca-local-size 256 --device cpu --tag cpu             # the committed CPU run
  PYTHONPATH=/root/site:. python3 benchmarks/bench_prefix_cache.py --tokens 1024000 \
      --dca-chunk-size 32768 --dca-local-size 8192 [--sparse] \
      --model /root/longctx-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out $OUT   # GPU 1M

Results: prefix_cache[_TAG].{json,md} under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, DCAConfig, SamplingParams  # noqa: E402
from longctx.engine.saved_kv import save_kv  # noqa: E402
from longctx.eval import passkey  # noqa: E402
from longctx.eval.haystack import build_case, prompt_frame  # noqa: E402
from longctx.server.engine_loop import EngineLoop, EngineRequest  # noqa: E402
from longctx.sparse.config import SparseConfig  # noqa: E402

OTHER_QUESTION = "Which five-digit number is the pass key?"


def make_llm(args) -> LLM:
    dca = None
    if args.dca_chunk_size:
        dca = DCAConfig(args.dca_chunk_size, args.dca_local_size, args.dca_chunk_size)
    sparse = SparseConfig(source="default", threshold=args.threshold) if args.sparse else False
    return LLM(
        model=args.model,
        random_weights=args.random_weights,
        dca=dca,
        sparse=sparse,
        kv_cache_gib=args.kv_gib,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        max_model_len=args.tokens + 256,
    )


def questions(llm: LLM, n: int) -> tuple[list[int], list[int], list[int], str | None]:
    """(document, question 1, question 2, expected answer): a passkey haystack of n tokens
    split before its question, and the same document asked in other words."""
    tok = llm.tokenizer
    if tok is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 1000, (n + 24,), generator=g).tolist()
        return ids[:n], ids[n : n + 12], ids[n + 12 :], None
    chat = tok.chat_template is not None
    case = build_case(passkey.make_task(), tok, length=n, depth=0.5, sample=0, seed=0, chat=chat)
    fields = {"number": case.expected}
    q1 = list(prompt_frame(passkey.make_task(), tok, fields, chat).suffix)
    q2 = list(prompt_frame(passkey.make_task(question=OTHER_QUESTION), tok, fields, chat).suffix)
    ids = list(case.prompt_token_ids)
    return ids[: len(ids) - len(q1)], q1, q2, case.expected


def timed_generate(llm: LLM, ids: list[int], params: SamplingParams) -> dict:
    """TTFT (to the first output carrying a token) and the greedy answer."""
    start = time.perf_counter()
    first: list[float] = []

    def on_output(out) -> None:
        if out.token_ids and not first:
            first.append(time.perf_counter() - start)

    out = llm.generate([ids], params, on_output=on_output)[0]
    return {"ttft_s": first[0], "token_ids": out.token_ids, "out": out}


def through_server(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
    """The prompts at once through the engine thread the HTTP server drives."""
    loop = EngineLoop(llm.engine)
    loop.start()

    async def ask(rid: str, ids: list[int]) -> dict:
        start = time.perf_counter()
        req = EngineRequest(request_id=rid, prompt=None, prompt_token_ids=ids, params=params)
        ttft = None
        async with loop.open([req]) as stream:
            async for out in stream:
                if out.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                if out.finished:
                    return {"ttft_s": ttft, "token_ids": out.token_ids, "out": out}
        raise RuntimeError(f"{rid} did not finish")

    async def main() -> list[dict]:
        return await asyncio.gather(*(ask(f"s{i}", p) for i, p in enumerate(prompts)))

    try:
        return asyncio.run(main())
    finally:
        loop.shutdown()


def run(args) -> tuple[list[dict], str]:
    llm = make_llm(args)
    doc, q1, q2, expected = questions(llm, args.tokens)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    blocks = llm.engine.scheduler.blocks
    # Compile costs out of the timed runs: a prompt of a few prefill chunks (first chunk,
    # later chunks, DCA's inter-chunk parts), then a follow-up on it (a short suffix over a
    # cached prefix).
    warm = [13] * min(args.tokens - 64, 3 * (args.dca_chunk_size or 8192))
    llm.generate([warm], SamplingParams(max_tokens=2))
    llm.generate([warm + [14] * 24], SamplingParams(max_tokens=2))
    blocks.forget_cached()
    rows = []

    def row(step: str, res: dict | None = None, **extra) -> None:
        r = {"step": step}
        if res is not None:
            r["ttft_s"] = res["ttft_s"]
            r["cached_tokens"] = res["out"].num_cached_tokens
            text = res["out"].text or str(res["token_ids"][:6])
            r["answer"] = " ".join(text.split())[:32]
        rows.append({**r, **extra})

    uncached = timed_generate(llm, doc + q1, params)
    row("doc + q1, uncached (prefill)", uncached)
    if args.load_only:
        return load_only(args, llm, doc, q1, params, uncached, rows, row)
    follow = timed_generate(llm, doc + q2, params)
    row("doc + q2, follow-up on the cached doc", follow)
    save_dir, save_s = save_doc(args, llm, doc, row)
    blocks.forget_cached()
    ref = timed_generate(llm, doc + q2, params)
    row("doc + q2, uncached (reference answer)", ref)
    blocks.forget_cached()
    load_s = load_doc(llm, save_dir, row)
    after = timed_generate(llm, doc + q2, params)
    row("doc + q2 after load_kv", after)
    served = [] if args.no_server else through_server(llm, [doc + q1, doc + q2], params)
    for name, res in zip(("q1", "q2"), served):
        row(f"server: doc + {name}, two clients at once, cached doc", res)
    if not args.save_dir:
        shutil.rmtree(save_dir, ignore_errors=True)
    same = {
        "follow-up == uncached": follow["token_ids"] == ref["token_ids"],
        "after load == uncached": after["token_ids"] == ref["token_ids"],
    }
    if served:
        same["server q1 == uncached"] = served[0]["token_ids"] == uncached["token_ids"]
        same["server q2 == uncached"] = served[1]["token_ids"] == ref["token_ids"]
    prefill = uncached["ttft_s"]
    notes = [
        "CPU run at a small size: checks the flow and the answers; the issue's figures "
        "(1M tokens on a GPU) are not measured here."
        if llm.engine.device.type == "cpu"
        else f"GPU: {torch.cuda.get_device_name()}.",
        f"Document {len(doc)} tokens (+ question {len(q1)} / {len(q2)}), model "
        f"{llm.engine.checkpoint.source}, device {llm.engine.device}, dtype {llm.engine.dtype}, "
        f"KV {llm.engine.runner.kv_dtype}, DCA {llm.engine.model_config.dca}, "
        f"sparse {'on' if args.sparse else 'off'}, block size {llm.engine.block_size}, "
        f"{args.max_tokens} answer tokens (greedy). Expected passkey: {expected}.",
        f"Cached follow-up TTFT / uncached: {follow['ttft_s'] / prefill:.3f}; save_kv "
        f"{save_s:.2f} s, load_kv {load_s:.2f} s = {load_s / prefill:.3f} of the prefill; "
        f"load + answer {(load_s + after['ttft_s']) / prefill:.3f} of the prefill.",
        "Greedy answers identical (token ids): "
        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items())
        + ".",
    ]
    return rows, "\n\n".join(notes)


def save_doc(args, llm: LLM, doc: list[int], row) -> tuple[Path, float]:
    """Save the cached document's KV (the write alone: it is cached); (directory, seconds)."""
    save_dir = Path(args.save_dir or tempfile.mkdtemp(prefix="longctx-kv-"))
    start = time.perf_counter()
    saved = save_kv(llm.engine, doc, save_dir, shard_bytes=args.shard_mib * 2**20)
    save_s = time.perf_counter() - start
    row("save_kv(doc), cached doc: the write", seconds=save_s, MiB=saved.num_bytes / 2**20)
    return save_dir, save_s


def load_doc(llm: LLM, save_dir: Path, row) -> float:
    """Load saved KV into the (emptied) prefix cache; seconds."""
    start = time.perf_counter()
    loaded = llm.load_kv(save_dir)
    load_s = time.perf_counter() - start
    row("load_kv(doc)", seconds=load_s, MiB=loaded.num_bytes / 2**20)
    return load_s


def load_only(args, llm, doc, q1, params, uncached, rows, row) -> tuple[list[dict], str]:
    """Save the cached document, drop the cache, load it back and ask q1 again: the saved-KV
    figure alone, in one prefill instead of two."""
    save_dir, _ = save_doc(args, llm, doc, row)
    llm.engine.scheduler.blocks.forget_cached()
    load_s = load_doc(llm, save_dir, row)
    after = timed_generate(llm, doc + q1, params)
    row("doc + q1 after load_kv", after)
    if not args.save_dir:
        shutil.rmtree(save_dir, ignore_errors=True)
    prefill = uncached["ttft_s"]
    notes = (
        f"--load-only on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
        f": document {len(doc)} tokens, KV {llm.engine.runner.kv_dtype}, DCA "
        f"{llm.engine.model_config.dca}. load_kv {load_s:.2f} s = {load_s / prefill:.3f} of "
        f"the prefill; load + answer {(load_s + after['ttft_s']) / prefill:.3f}. Greedy answer "
        "after the load identical to the uncached one (token ids): "
        + ("yes" if after["token_ids"] == uncached["token_ids"] else "NO")
        + "."
    )
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF / HF directory (default: the default)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048, help="document + question tokens")
    ap.add_argument("--dca-chunk-size", type=int, default=None)
    ap.add_argument("--dca-local-size", type=int, default=None)
    ap.add_argument("--sparse", action="store_true", help="sparse prefill, default budgets")
    ap.add_argument("--threshold", type=int, default=32768, help="sparse threshold")
    ap.add_argument("--kv-gib", type=float, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-tokens", type=int, default=12, help="answer tokens")
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--save-dir", default=None, help="where to save the KV (kept if given)")
    ap.add_argument("--no-server", action="store_true", help="skip the server part")
    ap.add_argument(
        "--load-only", action="store_true", help="prefill, save, load, answer: one prefill"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    rows, notes = run(args)
    name = "prefix_cache" + (f"_{args.tag}" if args.tag else "")
    write_results(out_dir(args.out), name, environment(), rows, notes)


if __name__ == "__main__":
    main()
