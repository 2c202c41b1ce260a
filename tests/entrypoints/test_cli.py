"""The CLI as a user runs it: a subprocess, stdout/stderr and exit codes."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

from longctx.loading import default_model_path


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longctx.entrypoints.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("longctx: error:")]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert proc.stdout == ""


def test_help_documents_every_flag():
    top = run_cli("--help")
    assert top.returncode == 0 and "generate" in top.stdout
    gen = run_cli("generate", "--help")
    for flag in (
        "--model",
        "--prompt",
        "--prompt-file",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--dca-chunk-size",
        "--max-num-batched-tokens",
    ):
        assert flag in gen.stdout


def test_missing_model_path(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(proc, "not found", "nope")


def test_directory_without_config(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(proc, "config.json")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert_one_line_error(run_cli("generate", "--model", str(bad), "--prompt", "hi"), "bad.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "bert")


@pytest.mark.parametrize(
    "flags,word",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--dca-chunk-size", "1024", "--dca-local-size", "2048"], "local_size"),
    ],
)
def test_invalid_parameters(flags, word):
    assert_one_line_error(run_cli("generate", "--prompt", "hi", *flags), word)


def test_missing_prompt_file(tmp_path):
    proc = run_cli("generate", "--prompt-file", str(tmp_path / "absent.txt"))
    assert_one_line_error(proc, "absent.txt")


@pytest.fixture(scope="module")
def default_model() -> str:
    return str(default_model_path(fetch=True))


def test_prompt_longer_than_context_limit(default_model):
    proc = run_cli(
        "generate", "--model", default_model, "--max-model-len", "32", "--prompt", "word " * 100
    )
    assert_one_line_error(proc, "context limit", "32")


def test_kv_budget_too_small(default_model):
    proc = run_cli(
        "generate",
        "--model",
        default_model,
        "--kv-cache-gib",
        "0.002",
        "--prompt",
        "word " * 200,
        "--max-tokens",
        "4",
    )
    assert_one_line_error(proc, "KV cache")


def test_generate_streams_text_alone_on_stdout(default_model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("def add(a, b):\n    return")
    proc = run_cli(
        "generate",
        "--model",
        default_model,
        "--prompt-file",
        str(prompt),
        "--max-tokens",
        "8",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("a + b")
