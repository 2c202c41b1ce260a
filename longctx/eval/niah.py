"""Needle in a haystack, RULER's single-needle form: "The special magic number for {city} is
{number}." hidden in varied essay-like filler, then asked for by city."""

from __future__ import annotations

import random

from longctx.eval.haystack import Fields, Filler, NeedleTask

NAME = "niah"
SUMMARY = "needle in a haystack: a city's 7-digit magic number hidden in varied filler"

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)
NEEDLE = "The special magic number for {city} is {number}."
QUESTION = "What is the special magic number for {city} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {city} mentioned in the provided text is"

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Berlin", "Bogota", "Brisbane", "Cairo",
    "Chicago", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Hanoi", "Helsinki", "Istanbul",
    "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "Madrid", "Manila", "Marseille", "Melbourne",
    "Montreal", "Munich", "Nairobi", "Oslo", "Porto", "Prague", "Santiago", "Seoul", "Stockholm",
    "Sydney", "Tallinn", "Toronto", "Valencia", "Vienna", "Warsaw", "Zagreb", "Zurich",
)  # fmt: skip

# Written for this filler: plain statements on unrelated everyday topics, reshuffled on every
# pass so that the haystack does not repeat in a fixed period.
FILLER = """
Most gardeners learn early that tomatoes want more sun than the seed packet admits.
A good bread dough feels slightly tacky and springs back slowly when pressed.
The old harbour was rebuilt twice after storms carried away its wooden piers.
Many people keep a notebook by the bed because ideas rarely arrive at convenient times.
Learning a second language changes the way a person hears the first one.
The committee met every Thursday, although most decisions were made in the corridor.
Bicycles outnumber cars in some cities, and the streets are designed around that fact.
A map is always a simplification, and choosing what to leave out is the real craft.
The library extended its opening hours during the examination season.
Small businesses often depend on a handful of loyal customers in their first year.
Winter light in the north is low and golden for most of the short day.
The recipe had been passed down through four generations with small changes each time.
Engineers prefer boring solutions for problems that must never fail.
A long walk after dinner is a habit that many doctors quietly recommend.
The museum moved its collection of clocks to a quieter room upstairs.
Good teachers remember what it was like not to understand the subject.
The river freezes only in the coldest years, and then the whole town skates on it.
Moving house reveals how many objects a family keeps without ever using them.
The orchestra rehearsed the final movement until the tempo felt natural.
Coffee tastes different at altitude because water boils at a lower temperature.
Every city has a neighbourhood that was unfashionable twenty years ago and is expensive now.
The train was late, so the passengers shared stories and sandwiches on the platform.
Writing a clear letter takes longer than writing a long one.
Old farmhouses were built with thick walls that stay cool through the summer.
Children invent rules for their games that adults would find far too complicated.
The market opens before sunrise, when the fishermen bring in the night's catch.
Careful measurement is the quiet foundation of nearly every scientific discovery.
The hikers reached the ridge just as the fog lifted from the valley below.
A well-organised kitchen saves more time than any expensive appliance.
Many famous inventions began as attempts to solve a completely different problem.
The town council debated the new bridge for years before construction began.
Some birds return to the same nesting site every spring for their whole lives.
The best conversations often happen when nobody is in a hurry to leave.
Paint dries faster on a windy day, but dust settles on it just as quickly.
The village celebrates the harvest with a long table set along the main street.
Reading old newspapers shows how differently people once described ordinary events.
A sailor learns to read the water as carefully as the sky.
The software team spent a week removing features that nobody had asked for.
Evening classes in pottery fill up within hours of registration opening.
The lighthouse keeper kept a diary of every ship that passed in the night.
"""


def niah_fields(rng: random.Random) -> Fields:
    return {"city": rng.choice(CITIES), "number": str(rng.randint(1_000_000, 9_999_999))}


def make_task(
    *,
    needle: str | None = None,
    question: str | None = None,
    answer_prefix: str | None = None,
    filler_text: str | None = None,
) -> NeedleTask:
    """The NIAH task; each argument left None keeps the standard text. A filler file is read in
    its own order (from a seeded sentence on); the built-in filler is shuffled."""
    return NeedleTask(
        name=NAME,
        instruction=INSTRUCTION,
        needle=needle or NEEDLE,
        question=question or QUESTION,
        answer_prefix=ANSWER_PREFIX if answer_prefix is None else answer_prefix,
        filler=Filler.from_text(filler_text) if filler_text else Filler.from_text(FILLER, True),
        make_fields=niah_fields,
    )
