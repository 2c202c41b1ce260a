"""`longctx prefill --save-kv` and `generate --load-kv` as the CLI runs them (in process, on a
tiny Hugging Face directory with a one-character-per-token tokenizer)."""

import pytest
from tokenizers import Tokenizer, models

from longctx.entrypoints.cli import main
from tests.hf_reference import tiny_hf_model

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
DOC = "the quick brown fox jumps over the lazy dog. " * 4  # 180 tokens
COMMON = ["--device", "cpu", "--dtype", "float32", "--block-size", "16", "--kv-cache-gib", "0.02"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_model(seed=2).save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ALPHABET)}, merges=[]))
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "doc.txt").write_text(DOC)
    (d / "ask.txt").write_text(DOC + "what jumps")
    return d


@pytest.fixture(scope="module")
def saved(model_dir, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "doc"
    args = ["prefill", "--model", str(model_dir), "--prompt-file", str(files / "doc.txt")]
    assert main([*args, "--save-kv", str(out), "--no-progress", *COMMON]) == 0
    return out


def generate(model_dir, files, *extra) -> list[str]:
    args = ["generate", "--model", str(model_dir), "--prompt-file", str(files / "ask.txt")]
    return [*args, "--max-tokens", "6", "--ignore-eos", "--no-progress", *COMMON, *extra]


def test_prefill_saves_and_generate_loads(model_dir, files, saved, capsys):
    assert (saved / "manifest.json").is_file()
    assert main(generate(model_dir, files, "--no-prefix-caching")) == 0
    want = capsys.readouterr().out
    assert main(generate(model_dir, files, "--load-kv", str(saved))) == 0
    got = capsys.readouterr()
    assert got.out == want
    assert "loaded KV of 176 tokens" in got.err


def test_prefill_reports_what_it_saved(model_dir, files, tmp_path, capsys):
    args = ["prefill", "--model", str(model_dir), "--prompt", DOC, "--save-kv", str(tmp_path)]
    assert main([*args, *COMMON]) == 0
    assert "saved KV of 176 tokens (11 blocks" in capsys.readouterr().err


def one_line_error(capsys, *words) -> None:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("longctx: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_load_kv_with_other_settings_exits_2(model_dir, files, saved, capsys):
    args = generate(model_dir, files, "--load-kv", str(saved))
    assert main([*args, "--block-size", "32"]) == 2
    one_line_error(capsys, "block_size = 16", "--block-size 16")


def test_load_kv_of_a_corrupt_directory_exits_2(model_dir, files, saved, tmp_path, capsys):
    import shutil

    bad = shutil.copytree(saved, tmp_path / "bad")
    shard = bad / "kv-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(generate(model_dir, files, "--load-kv", str(bad))) == 2
    one_line_error(capsys, "kv-00000.safetensors is truncated")


def test_save_kv_without_prefix_caching_exits_2(model_dir, tmp_path, capsys):
    args = ["prefill", "--model", str(model_dir), "--prompt", DOC, "--save-kv", str(tmp_path)]
    assert main([*args, "--no-prefix-caching", *COMMON]) == 2
    one_line_error(capsys, "--no-prefix-caching")


def test_serve_loads_saved_kv_before_serving(model_dir, saved, capsys):
    pytest.importorskip("fastapi")
    from longctx.entrypoints import serve_cmd
    from longctx.entrypoints.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--load-kv", str(saved), *COMMON]
    )
    args.allowed_origins = ()
    _, name, loop = serve_cmd._build_app(args, None)
    assert name == model_dir.name
    loop.shutdown()
    assert f"loaded KV of 176 tokens from {saved}" in capsys.readouterr().err


def test_load_progress_goes_to_stderr(model_dir, saved, capsys):
    from longctx import LLM

    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", block_size=16)
    llm.load_kv(saved, use_tqdm=True)
    out = capsys.readouterr()
    assert "load KV" in out.err and out.out == ""
