"""The real default model (Qwen2.5-Coder-0.5B-Instruct GGUF): longctx's greedy output equals
transformers' greedy output, both loading the same GGUF file."""

import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.loading import default_model_path

PROMPTS = [
    "def quicksort(xs):",
    "The three primary colors are",
    "<|im_start|>user\nWrite a haiku about caches.<|im_end|>\n<|im_start|>assistant\n",
]
STEPS = 24


@pytest.fixture(scope="module")
def path():
    return default_model_path(fetch=True)


@pytest.fixture(scope="module")
def ours(path):
    return LLM(model=path, dtype="float32", device="cpu", max_num_batched_tokens=8)


@pytest.fixture(scope="module")
def hf_greedy(path, ours):
    """transformers' greedy continuations, computed once; the model is freed afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    outs = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([ours.tokenizer.encode(p)])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=STEPS,
                min_new_tokens=STEPS,
                do_sample=False,
                pad_token_id=None,
                eos_token_id=None,
            )
            outs.append(gen[0, ids.shape[1] :].tolist())
    del model
    return outs


def test_greedy_equals_transformers_from_the_same_gguf(ours, hf_greedy):
    # Prefill chunks of 8 tokens and a batch of three prompts exercise the paged paths.
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    outs = ours.generate(PROMPTS, params)
    for out, ref in zip(outs, hf_greedy):
        assert out.token_ids == ref


def test_chat_answers(ours):
    out = ours.chat(
        [{"role": "user", "content": "What is 12 + 30? Reply with the number only."}],
        SamplingParams(max_tokens=8, temperature=0),
    )[0]
    assert "42" in out.text
