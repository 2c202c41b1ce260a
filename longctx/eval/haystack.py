"""Synthetic haystacks: filler text of an exact token length with a needle at a chosen depth.

Everything is built in token ids, not text, so lengths are exact. Each filler sentence is
tokenized once (with its leading space) and sentences are concatenated id-wise; the prompt is
the ids of the text before the haystack, the haystack, and the ids of the text after it:

    [ prefix: chat template + instruction ][ filler ... needle ... filler ][ suffix: question ]
    |<----------------------------------- length tokens exactly -------------------------->|

The needle goes in at the sentence boundary nearest to depth * (filler tokens), so sentences
stay whole. Whatever the whole sentences cannot fill (fewer tokens than the shortest sentence)
becomes newline tokens at the end of the filler, a paragraph break before the question.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from longctx.errors import ConfigError
from longctx.tokenizer import Tokenizer

HAYSTACK_MARK = "\x00HAYSTACK\x00"  # stands in for the haystack while the template renders

Fields = dict[str, str]  # what a needle / question / answer prefix template is formatted with


@dataclass(frozen=True)
class Filler:
    """The sentences filler is drawn from: in order from a seeded starting sentence (natural text
    keeps its flow), or reshuffled on every pass (a pool of unrelated sentences)."""

    sentences: tuple[str, ...]
    shuffle: bool = False

    def __post_init__(self) -> None:
        if not self.sentences:
            raise ConfigError("filler text has no sentences")

    @classmethod
    def from_text(cls, text: str, shuffle: bool = False) -> Filler:
        return cls(tuple(split_sentences(text)), shuffle)

    def stream(self, rng: random.Random) -> Iterator[int]:
        """Indices into `sentences`, endlessly."""
        n = len(self.sentences)
        if not self.shuffle:
            start = rng.randrange(n)
            while True:
                yield from ((start + i) % n for i in range(n))
                start = 0
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by whitespace), whitespace collapsed."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if s]


@dataclass(frozen=True)
class NeedleTask:
    """A retrieval task: where the needle hides, what it says and what is asked.

    needle, question and answer_prefix are format strings over the fields `make_fields` draws
    for a case; fields["number"] is the answer. The answer prefix opens the model's reply, so
    a small model answers with the number at once.
    """

    name: str
    instruction: str
    needle: str
    question: str
    answer_prefix: str
    filler: Filler
    make_fields: Callable[[random.Random], Fields]

    def __post_init__(self) -> None:
        if "{number}" not in self.needle:
            raise ConfigError(f"the needle must contain {{number}} (the answer): {self.needle!r}")
        for template in (self.needle, self.question, self.answer_prefix):
            self.render(template, {"number": "0", "city": "x"})

    @staticmethod
    def render(template: str, fields: Fields) -> str:
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"bad template {template!r}: {e!r}") from None


@dataclass(frozen=True)
class NeedleCase:
    """One prompt: `length` tokens with the needle at `depth` (asked for) / `needle_depth` (where
    the nearest sentence boundary put it)."""

    task: str
    length: int
    depth: float
    sample: int
    expected: str
    prompt_token_ids: tuple[int, ...]
    needle_depth: float

    @property
    def key(self) -> tuple[int, float, int]:
        return self.length, self.depth, self.sample


@dataclass(frozen=True)
class PromptFrame:
    """Token ids before and after the haystack."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def prompt_frame(task: NeedleTask, tokenizer: Tokenizer, fields: Fields, chat: bool) -> PromptFrame:
    """The instruction and question around the haystack, in the chat template when asked, the
    reply opened with the answer prefix."""
    question = task.render(task.question, fields)
    user = f"{task.instruction}\n\n{HAYSTACK_MARK}\n\n{question}"
    answer = task.render(task.answer_prefix, fields)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}]) + answer
    else:
        text = f"{user} {answer}"
    before, after = text.split(HAYSTACK_MARK)
    return PromptFrame(tuple(tokenizer.encode(before)), tuple(tokenizer.encode(after)))


def build_case(
    task: NeedleTask,
    tokenizer: Tokenizer,
    *,
    length: int,
    depth: float,
    sample: int,
    seed: int,
    chat: bool,
) -> NeedleCase:
    """The prompt of one case, exactly `length` tokens, the same for the same arguments.

    The filler depends on (seed, length, sample) only, so the depths of one sample share their
    haystack; the needle's fields also depend on the depth.
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1], got {depth}")
    fields = task.make_fields(random.Random(f"{seed}:{task.name}:{length}:{depth}:{sample}"))
    frame = prompt_frame(task, tokenizer, fields, chat)
    needle = tokenizer.encode(" " + task.render(task.needle, fields))
    budget = length - len(frame.prefix) - len(frame.suffix) - len(needle)
    if budget < 0:
        raise ConfigError(
            f"length {length} is shorter than the prompt without filler ({length - budget} tokens)"
        )
    sentences = fill_sentences(
        task.filler, tokenizer, budget, random.Random(f"{seed}:{length}:{sample}")
    )
    haystack, at = insert_at_depth(sentences, needle, depth)
    ids = frame.prefix + tuple(haystack) + frame.suffix
    return NeedleCase(
        task=task.name,
        length=length,
        depth=depth,
        sample=sample,
        expected=fields["number"],
        prompt_token_ids=ids,
        needle_depth=at / budget if budget else 0.0,
    )


def fill_sentences(
    filler: Filler, tokenizer: Tokenizer, budget: int, rng: random.Random
) -> list[list[int]]:
    """Whole sentences (token ids each) totalling exactly `budget` tokens.

    Sentences come in the filler's order while they fit; then the longest that still fits,
    until none does; the rest (shorter than any sentence) is one newline-token piece.
    """
    encoded = [tokenizer.encode(" " + s) for s in filler.sentences]
    by_len = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    lengths = [len(encoded[i]) for i in by_len]
    out: list[list[int]] = []
    left = budget
    for i in filler.stream(rng):
        if len(encoded[i]) > left:
            break
        out.append(encoded[i])
        left -= len(encoded[i])
    while (k := bisect.bisect_right(lengths, left)) > 0:
        out.append(encoded[by_len[k - 1]])
        left -= lengths[k - 1]
    if left:
        out.append(tokenizer.encode("\n") * left)
    return out


def insert_at_depth(
    sentences: list[list[int]], needle: list[int], depth: float
) -> tuple[list[int], int]:
    """Concatenate the sentences with the needle at the boundary nearest depth * total tokens;
    return the ids and the needle's token offset."""
    bounds = [0]
    for s in sentences:
        bounds.append(bounds[-1] + len(s))
    target = depth * bounds[-1]
    k = min(range(len(bounds)), key=lambda i: abs(bounds[i] - target))
    ids = [t for s in sentences[:k] for t in s] + needle + [t for s in sentences[k:] for t in s]
    return ids, bounds[k]
