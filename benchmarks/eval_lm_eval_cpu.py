"""lm-eval through the server equals lm-eval on transformers: a loglikelihood task scored by
lm-eval's `local-completions` model (which sends echo + logprobs to /v1/completions) against
its `hf` model on the same weights.

The weights are a tiny random Qwen2 with a byte-level tokenizer, saved as a Hugging Face
directory in a temporary folder; the task is a small multiple-choice file written next to it.
The server runs in this process (uvicorn on a loopback port) over the saved directory. lm-eval
is not in the [test] extra (it pulls in pandas, pyarrow, scipy and scikit-learn), so this is a
script: `pip install lm-eval`, then

  .venv/bin/python benchmarks/eval_lm_eval_cpu.py [--out benchmarks/results/lm_eval_cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "longctx_tiny_mc"
DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud", " wet"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Water freezes at zero", "choices": [" degrees", " miles", " cats"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "answer": 0},
    {"question": "Paris is the capital of", "choices": [" France", " Spain", " Peru"], "answer": 1},
    {"question": "ab" * 30, "choices": ["ab", "ba", "zz"], "answer": 2},
]


def save_tiny_model(directory: Path) -> None:
    """A random Qwen2 (vocab 320) and a byte-level BPE tokenizer over its 256 bytes."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from tests.hf_reference import tiny_hf_model

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
    tokenizer.add_special_tokens({"eos_token": eos})
    tokenizer.save_pretrained(directory)
    model = tiny_hf_model(seed=7, vocab_size=320)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)


def write_task(directory: Path) -> None:
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, port: int):
    """The longctx server over model_dir on 127.0.0.1:port, in a thread; returns its stopper."""
    import uvicorn

    from longctx import LLM
    from longctx.server.app import ServerConfig, create_app
    from longctx.server.engine_loop import EngineLoop

    llm = LLM(str(model_dir), device="cpu", dtype="float32", kv_cache_gib=0.05, block_size=16)
    app = create_app(EngineLoop(llm.engine), ServerConfig("tiny", local_only=True))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    return stop


def evaluate(model: str, model_args: str, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    samples = out["samples"][TASK]
    return {
        "acc": out["results"][TASK]["acc,none"],
        "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lm_eval_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, task_dir = Path(tmp) / "model", Path(tmp) / "tasks"
        task_dir.mkdir()
        save_tiny_model(model_dir)
        write_task(task_dir)
        hf = evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu", task_dir)
        port = free_port()
        stop = serve(model_dir, port)
        try:
            server = evaluate(
                "local-completions",
                f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,"
                f"tokenizer={model_dir},tokenized_requests=True,num_concurrent=1,max_retries=1",
                task_dir,
            )
        finally:
            stop()
    pairs = zip(sum(hf["loglikelihoods"], []), sum(server["loglikelihoods"], []))
    worst = max(abs(a - b) for a, b in pairs)
    report = {"hf": hf, "server": server, "max_abs_loglikelihood_diff": worst}
    ok = hf["acc"] == server["acc"] and worst < 1e-3 and not math.isnan(worst)
    report["equal"] = ok
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# lm-eval: local-completions (longctx server) vs hf, same tiny weights (CPU)\n\n"
        f"| model | acc | |\n|---|---|---|\n| hf | {hf['acc']:.4f} | |\n"
        f"| local-completions | {server['acc']:.4f} | max per-choice loglikelihood diff "
        f"{worst:.2e} |\n\nEqual: {ok}\n"
    )
    print(json.dumps({"hf_acc": hf["acc"], "server_acc": server["acc"], "max_diff": worst}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
