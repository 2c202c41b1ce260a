"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random 5-digit key hidden in repetitive
filler; the model is asked for it at the end."""

from __future__ import annotations

import random

from longctx.eval.haystack import Fields, Filler, NeedleTask

NAME = "passkey"
SUMMARY = "passkey retrieval: a 5-digit key hidden in repetitive filler"

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
NEEDLE = "The pass key is {number}. Remember it. {number} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey_fields(rng: random.Random) -> Fields:
    return {"number": str(rng.randint(10_000, 99_999))}


def make_task(
    *,
    needle: str | None = None,
    question: str | None = None,
    answer_prefix: str | None = None,
    filler_text: str | None = None,
) -> NeedleTask:
    """The passkey task; each argument left None keeps the standard text."""
    return NeedleTask(
        name=NAME,
        instruction=INSTRUCTION,
        needle=needle or NEEDLE,
        question=question or QUESTION,
        answer_prefix=ANSWER_PREFIX if answer_prefix is None else answer_prefix,
        filler=Filler.from_text(filler_text or FILLER),
        make_fields=passkey_fields,
    )
