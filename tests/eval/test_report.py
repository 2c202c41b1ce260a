"""Scoring and the result files: table, results.json, results.md, heatmap.png, resuming."""

import json

import pytest

from longctx.errors import LongctxError
from longctx.eval.report import (
    HEATMAP_PNG,
    RESULTS_JSON,
    RESULTS_MD,
    accuracy_grid,
    format_table,
    load_results,
    write_report,
)
from longctx.eval.runner import CaseResult, score


@pytest.mark.parametrize(
    "output,expected,ok",
    [
        (" 71432.", "71432", True),
        ("The pass key is 71432", "71432", True),
        ("71432 is it, not 12345", "71432", True),
        ("714321", "71432", False),  # a longer number is not the key
        ("7143", "71432", False),
        ("7 1 4 3 2", "71432", False),
        ("", "71432", False),
        ("no digits at all", "71432", False),
    ],
)
def test_score_is_an_exact_number_match(output, expected, ok):
    assert score(output, expected) is ok


def result(length, depth, sample, correct, output="x"):
    return CaseResult(
        task="passkey",
        length=length,
        depth=depth,
        sample=sample,
        expected="12345",
        output=output,
        correct=correct,
        prompt_tokens=length,
        seconds=1.5,
        needle_depth=depth,
    )


RESULTS = [
    result(4096, 0.1, 0, True),
    result(4096, 0.1, 1, False),
    result(4096, 0.9, 0, True),
    result(8192, 0.1, 0, False),
    result(8192, 0.9, 0, True, output="a | b `c`"),
]
RUN = {"task": "passkey", "label": "DCA chunk 2048 / local 512", "seed": 0, "lengths": [4096]}


def test_grid_and_table():
    lengths, depths, cells = accuracy_grid(RESULTS)
    assert lengths == [4096, 8192] and depths == [0.1, 0.9]
    assert cells[(4096, 0.1)] == (1, 2) and cells[(8192, 0.1)] == (0, 1)
    table = format_table(RESULTS).splitlines()
    assert table[0] == "| depth \\ length | 4096 | 8192 |"
    assert table[2] == "| 0.1 | 0.50 (1/2) | 0.00 (0/1) |"
    assert table[3] == "| 0.9 | 1.00 (1/1) | 1.00 (1/1) |"
    assert table[4] == "| all | 3/5 = 0.60 |"


def test_missing_cells_show_a_dash():
    table = format_table([result(4096, 0.1, 0, True), result(8192, 0.5, 0, True)])
    assert "| 0.1 | 1.00 (1/1) | - |" in table


def test_write_report_files(tmp_path):
    out = tmp_path / "run"
    write_report(out, RUN, RESULTS)
    doc = json.loads((out / RESULTS_JSON).read_text())
    assert doc["run"] == RUN
    assert len(doc["cases"]) == 5
    assert set(doc["cases"][0]) >= {
        "length", "depth", "sample", "expected", "output", "correct", "prompt_tokens", "seconds"
    }  # fmt: skip
    md = (out / RESULTS_MD).read_text()
    assert "| 0.1 | 0.50 (1/2) | 0.00 (0/1) |" in md
    assert "a \\| b 'c'" in md  # outputs cannot break the case table
    png = (out / HEATMAP_PNG).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not list(out.glob("*.tmp*"))


def test_resume_keeps_cases_of_the_same_settings(tmp_path):
    write_report(tmp_path, RUN, RESULTS)
    more_lengths = {**RUN, "lengths": [4096, 65536], "started": "later"}
    assert load_results(tmp_path, more_lengths) == RESULTS
    assert load_results(tmp_path / "empty", RUN) == []
    with pytest.raises(LongctxError, match="seed"):
        load_results(tmp_path, {**RUN, "seed": 1})
    (tmp_path / RESULTS_JSON).write_text("{not json")
    with pytest.raises(LongctxError, match="cannot resume"):
        load_results(tmp_path, RUN)
