"""run_batch against a fake LLM that prefills in chunks and emits outputs the way the engine
does: every step, an output for every running request, in no particular order."""

import time

from longctx.engine.outputs import RequestOutput
from longctx.eval.haystack import NeedleCase
from longctx.eval.runner import run_batch

CASES = [
    NeedleCase("passkey", 10, depth, 0, key, tuple(range(i, i + 10)), depth)
    for i, (depth, key) in enumerate(((0.1, "11111"), (0.5, "22222"), (0.9, "33333")))
]
ANSWERS = [" 11111.", " 2222", "The pass key is 33333"]


class FakeLLM:
    """Prefills 6 tokens per step, first come first served; a prefilled request then decodes
    one token per step and finishes after two. Outputs come in reverse request order."""

    def generate(self, prompts, params, on_output):
        assert params.temperature == 0.0 and params.max_tokens == 4
        computed, decoded = [0] * len(prompts), [0] * len(prompts)
        while min(decoded) < 2:
            running = [i for i, p in enumerate(prompts) if computed[i] and decoded[i] < 2]
            budget = 6
            for i, p in enumerate(prompts):
                if computed[i] == len(p):
                    decoded[i] += decoded[i] < 2
                elif budget:
                    n = min(len(p) - computed[i], budget)
                    computed[i], budget = computed[i] + n, budget - n
                    running += [] if i in running else [i]
            time.sleep(0.01)
            for i in sorted(running, reverse=True):
                on_output(self.output(i, prompts[i], computed[i], decoded[i] == 2))

    @staticmethod
    def output(i, prompt, computed, finished):
        text = ANSWERS[i] if finished else ""
        return RequestOutput(
            str(100 + i), None, list(prompt), text, "", [], None, None, finished, None, computed
        )


def test_results_come_back_in_case_order_scored_and_timed(capsys):
    seen = []
    results = run_batch(FakeLLM(), CASES, max_tokens=4, on_result=seen.append, log_every_s=0)
    assert [r.depth for r in results] == [0.1, 0.5, 0.9]
    assert [r.correct for r in results] == [True, False, True]
    assert [r.output for r in results] == ANSWERS
    assert all(r.prompt_tokens == 10 and r.seconds > 0 for r in results)
    assert sorted(r.depth for r in seen) == [0.1, 0.5, 0.9]  # each reported once, as it finished
    err = capsys.readouterr().err
    assert "[passkey 10] depth 0.5 sample 0: expected 22222, got '2222' WRONG" in err
    assert "3/3 cases, prefill 30/30 tokens" in err


def test_silent_without_progress(capsys):
    run_batch(FakeLLM(), CASES, max_tokens=4, progress=False)
    assert capsys.readouterr().err == ""
