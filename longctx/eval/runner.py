"""Run needle cases through an `LLM`, one batch per length, score them, report progress.

Cases of one length go to `LLM.generate` together (greedy). The scheduler prefills them one
after another (a running prompt takes the token budget first) while the ones already prefilled
decode alongside, a token per step. So a case's `seconds` is its prefill time: from the end of
the previous case's prefill (or the batch's start) to the end of its own, to within one step.
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from longctx.engine.outputs import RequestOutput
from longctx.eval.haystack import NeedleCase
from longctx.sampling_params import SamplingParams


@dataclass(frozen=True)
class CaseResult:
    task: str
    length: int
    depth: float
    sample: int
    expected: str
    output: str
    correct: bool
    prompt_tokens: int
    seconds: float
    needle_depth: float

    @property
    def key(self) -> tuple[int, float, int]:
        return self.length, self.depth, self.sample

    def to_dict(self) -> dict:
        return asdict(self)


def score(output: str, expected: str) -> bool:
    """Exact match of the number: `expected` is one of the whole numbers in the output."""
    return expected in re.findall(r"\d+", output)


def run_batch(
    llm,
    cases: Sequence[NeedleCase],
    max_tokens: int,
    on_result: Callable[[CaseResult], None] | None = None,
    progress: bool = True,
    log_every_s: float = 30.0,
) -> list[CaseResult]:
    """Generate for every case in one batch; results in case order. on_result sees each case as
    it finishes (to save partial results); progress lines go to stderr."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tracker = _Tracker(cases, on_result, progress, log_every_s)
    llm.generate([list(c.prompt_token_ids) for c in cases], params, on_output=tracker.update)
    return [tracker.results[i] for i in range(len(cases))]


class _Tracker:
    """Matches finished outputs to cases (by prompt), times and scores them, logs progress."""

    def __init__(
        self,
        cases: Sequence[NeedleCase],
        on_result: Callable[[CaseResult], None] | None,
        progress: bool,
        log_every_s: float,
    ) -> None:
        self.cases = cases
        self.on_result, self.progress, self.log_every_s = on_result, progress, log_every_s
        self.by_prompt: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, c in enumerate(cases):
            self.by_prompt[c.prompt_token_ids].append(i)
        self.results: dict[int, CaseResult] = {}
        self.case_of: dict[str, int] = {}  # request id -> case index
        self.prefilled: dict[str, int] = {}
        self.prefill_s: dict[int, float] = {}
        self.total = sum(len(c.prompt_token_ids) for c in cases)
        self.start = self.last_prefill = self.last_log = time.perf_counter()

    def update(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        rid = out.request_id
        if rid not in self.case_of:
            self.case_of[rid] = self.by_prompt[tuple(out.prompt_token_ids)].pop(0)
        i = self.case_of[rid]
        self.prefilled[rid] = out.num_computed_prompt_tokens
        if i not in self.prefill_s and out.num_computed_prompt_tokens == len(out.prompt_token_ids):
            self.prefill_s[i] = now - self.last_prefill
            self.last_prefill = now
        if out.finished:
            self._finish(i, out.text, now)
        elif self.progress and now - self.last_log >= self.log_every_s:
            self._say(self._rate(now))

    def _finish(self, i: int, text: str, now: float) -> None:
        c = self.cases[i]
        result = CaseResult(
            task=c.task,
            length=c.length,
            depth=c.depth,
            sample=c.sample,
            expected=c.expected,
            output=text,
            correct=score(text, c.expected),
            prompt_tokens=len(c.prompt_token_ids),
            seconds=round(self.prefill_s.get(i, now - self.last_prefill), 2),
            needle_depth=round(c.needle_depth, 4),
        )
        self.results[i] = result
        if self.on_result is not None:
            self.on_result(result)
        if self.progress:
            mark = "ok" if result.correct else "WRONG"
            self._say(
                f"depth {c.depth:g} sample {c.sample}: expected {c.expected}, got "
                f"{text.strip()!r} {mark} (prefill {result.seconds:.1f} s); {self._rate(now)}"
            )

    def _rate(self, now: float) -> str:
        done = sum(self.prefilled.values())
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        return (
            f"{len(self.results)}/{len(self.cases)} cases, prefill {done}/{self.total} tokens, "
            f"{rate:.0f} tok/s, ETA {eta / 60:.1f} min"
        )

    def _say(self, text: str) -> None:
        print(f"[{self.cases[0].task} {self.cases[0].length}] {text}", file=sys.stderr, flush=True)
        self.last_log = time.perf_counter()
