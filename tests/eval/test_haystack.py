"""Haystack building: exact token lengths, needle placement at sentence boundaries, seeds."""

import random

import pytest

from longctx.errors import ConfigError
from longctx.eval import niah, passkey
from longctx.eval.haystack import (
    Filler,
    build_case,
    fill_sentences,
    insert_at_depth,
    prompt_frame,
    split_sentences,
)

TASKS = [passkey.make_task(), niah.make_task()]


def case(task, tokenizer, length=2048, depth=0.5, sample=0, seed=0, chat=True):
    return build_case(
        task, tokenizer, length=length, depth=depth, sample=sample, seed=seed, chat=chat
    )


def needle_ids(task, tokenizer, c):
    fields = {"number": c.expected}
    if "{city}" in task.needle:
        text = tokenizer.decode(c.prompt_token_ids)
        fields["city"] = next(x for x in niah.CITIES if f"number for {x} is" in text)
    return tokenizer.encode(" " + task.render(task.needle, fields))


def find(ids, sub):
    hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("length", [300, 1000, 2047, 4096, 10_001])
def test_prompts_have_exactly_the_asked_length(tokenizer, task, chat, length):
    c = case(task, tokenizer, length=length, chat=chat)
    assert len(c.prompt_token_ids) == length


@pytest.mark.parametrize("budget", range(0, 80))
def test_filler_fills_any_budget_exactly_with_whole_sentences(tokenizer, budget):
    filler = passkey.make_task().filler
    sentences = fill_sentences(filler, tokenizer, budget, random.Random(budget))
    assert sum(map(len, sentences)) == budget
    whole = [tokenizer.encode(" " + s) for s in filler.sentences]
    newline = tokenizer.encode("\n")
    # every piece is a whole sentence, except the newline padding at the end (< any sentence)
    assert all(s in whole for s in sentences[:-1])
    if sentences and sentences[-1] not in whole:
        assert set(sentences[-1]) == set(newline)
        assert len(sentences[-1]) < min(map(len, whole))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_asked_depth_between_sentences(tokenizer, task, depth):
    c = case(task, tokenizer, length=4096, depth=depth)
    ids = list(c.prompt_token_ids)
    start = find(ids, needle_ids(task, tokenizer, c))
    assert abs(c.needle_depth - depth) < 0.01  # sentences are ~5-20 of ~3900 filler tokens
    before = tokenizer.decode(ids[:start])
    after = tokenizer.decode(ids[start + len(needle_ids(task, tokenizer, c)) :])
    assert before.endswith((".", "\n"))  # a sentence ended (or the instruction did)
    assert after.startswith((" ", "\n"))  # the next sentence or the question follows


def test_depth_zero_and_one_put_the_needle_at_the_ends_of_the_filler(tokenizer):
    task = passkey.make_task()
    for depth in (0.0, 1.0):
        c = case(task, tokenizer, depth=depth)
        frame = prompt_frame(task, tokenizer, {"number": c.expected}, chat=True)
        needle = needle_ids(task, tokenizer, c)
        filler = 2048 - len(frame.prefix) - len(frame.suffix) - len(needle)
        start = find(list(c.prompt_token_ids), needle)
        assert start == len(frame.prefix) + depth * filler
        assert c.needle_depth == depth


def test_same_arguments_same_prompt_and_seed_changes_it(tokenizer):
    for task in TASKS:
        a, b = case(task, tokenizer, seed=3), case(task, tokenizer, seed=3)
        assert a == b
        assert case(task, tokenizer, seed=4).prompt_token_ids != a.prompt_token_ids
        assert case(task, tokenizer, seed=3, sample=1).prompt_token_ids != a.prompt_token_ids


def test_depths_of_one_sample_share_the_filler(tokenizer):
    task = niah.make_task()
    cases = [case(task, tokenizer, depth=d) for d in (0.2, 0.7)]
    stripped = []
    for c in cases:
        ids = list(c.prompt_token_ids)
        needle = needle_ids(task, tokenizer, c)
        start = find(ids, needle)
        body = ids[:start] + ids[start + len(needle) :]
        stripped.append(tokenizer.decode(body).split("\n\n")[1])  # the filler paragraph
    assert stripped[0] == stripped[1]


def test_keys_are_five_and_seven_digits(tokenizer):
    keys = [case(passkey.make_task(), tokenizer, sample=s).expected for s in range(5)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == 5
    assert len(case(niah.make_task(), tokenizer).expected) == 7


def test_question_and_answer_prefix_close_the_prompt(tokenizer):
    c = case(passkey.make_task(), tokenizer)
    text = tokenizer.decode(c.prompt_token_ids, skip_special_tokens=False)
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    raw = case(passkey.make_task(), tokenizer, chat=False)
    assert tokenizer.decode(raw.prompt_token_ids).endswith("What is the pass key? The pass key is")


def test_custom_needle_and_filler(tokenizer):
    task = niah.make_task(
        needle="The secret code of {city} is {number}.",
        filler_text="One apple fell. Two birds sang! Three clouds passed? Four dogs barked.",
    )
    c = case(task, tokenizer, length=600)
    text = tokenizer.decode(c.prompt_token_ids)
    assert f"is {c.expected}." in text and "The secret code of" in text
    assert "One apple fell. Two birds sang! Three clouds passed? Four dogs barked." in text
    assert len(c.prompt_token_ids) == 600


def test_bad_inputs_are_config_errors(tokenizer):
    with pytest.raises(ConfigError, match="number"):
        passkey.make_task(needle="no answer here")
    with pytest.raises(ConfigError, match="template"):
        passkey.make_task(needle="{number} {unknown}")
    with pytest.raises(ConfigError, match="shorter"):
        case(passkey.make_task(), tokenizer, length=50)
    with pytest.raises(ConfigError, match="depth"):
        case(passkey.make_task(), tokenizer, depth=1.5)
    with pytest.raises(ConfigError, match="no sentences"):
        Filler.from_text("   ")


def test_split_sentences():
    assert split_sentences(" A b.  C d!\nE f? G") == ["A b.", "C d!", "E f?", "G"]


def test_insert_at_depth_picks_the_nearest_boundary():
    sentences = [[1, 1], [2, 2, 2], [3]]
    assert insert_at_depth(sentences, [9], 0.0) == ([9, 1, 1, 2, 2, 2, 3], 0)
    assert insert_at_depth(sentences, [9], 0.5) == ([1, 1, 9, 2, 2, 2, 3], 2)  # 3: 2, not 5
    assert insert_at_depth(sentences, [9], 0.75) == ([1, 1, 2, 2, 2, 9, 3], 5)  # 4.5: 5
    assert insert_at_depth(sentences, [9], 1.0) == ([1, 1, 2, 2, 2, 3, 9], 6)


def test_filler_stream_orders():
    in_order = Filler(("a", "b", "c"))
    idx = in_order.stream(random.Random(1))
    first = [next(idx) for _ in range(7)]
    assert first[1] == (first[0] + 1) % 3 and first[3:6] == [0, 1, 2]
    shuffled = Filler(tuple("abcdef"), shuffle=True).stream(random.Random(0))
    passes = [sorted(next(shuffled) for _ in range(6)) for _ in range(3)]
    assert passes == [list(range(6))] * 3
