"""`longctx eval`: flag parsing, one-line errors, and real passkey retrieval on the default model
(the CI check of DCA: a short prompt over several DCA chunks must still be answered)."""

import argparse
import json

import pytest

from longctx.entrypoints import cli
from longctx.entrypoints.eval_cmd import parse_depths, parse_lengths
from longctx.loading import default_model_path


def test_parse_lengths_and_depths():
    assert parse_lengths("4096, 8k,64K") == [4096, 8192, 65536]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "abc", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lengths(bad)
    for bad in ("", "x", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_depths(bad)


def test_bad_depth_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "passkey", "--depths", "2"])
    assert e.value.code == 2
    assert "depths must be in [0, 1]" in capsys.readouterr().err


def test_clamp_with_dca_is_refused_in_one_line(capsys):
    argv = ["eval", "niah", "--positions-clamp", "2048", "--dca-chunk-size", "2048"]
    assert cli.main([*argv, "--dca-local-size", "512"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longctx: error: --positions-clamp")


def test_missing_filler_file_is_one_line(tmp_path, capsys):
    argv = ["eval", "passkey", "--filler-file", str(tmp_path / "absent.txt")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert "absent.txt" in capsys.readouterr().err


def passkey_run(tmp_path, capsys, length: int, *flags: str) -> dict:
    out = tmp_path / "out"
    argv = ["eval", "passkey", "--model", str(default_model_path(fetch=True))]
    argv += ["--lengths", str(length), "--depths", "0.5", "--samples", "1", "--dtype", "float32"]
    argv += ["--max-num-batched-tokens", "4096", "--out", str(out), *flags]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert f"| depth \\ length | {length} |" in table
    assert (out / "results.md").is_file() and (out / "heatmap.png").stat().st_size > 0
    doc = json.loads((out / "results.json").read_text())
    [case] = doc["cases"]
    assert case["prompt_tokens"] == length and case["depth"] == 0.5
    return case


def test_passkey_3k_over_four_dca_chunks_is_retrieved(tmp_path, capsys):
    # c = 1024 - 256 = 768: the 3072-token prompt spans four DCA chunks, so the needle at depth
    # 0.5 is reached only through the inter-chunk part of DCA.
    case = passkey_run(
        tmp_path, capsys, 3072, "--dca-chunk-size", "1024", "--dca-local-size", "256"
    )
    assert case["correct"], case


def test_passkey_2k_without_dca_is_retrieved(tmp_path, capsys):
    case = passkey_run(tmp_path, capsys, 2048)
    assert case["correct"], case
