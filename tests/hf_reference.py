"""An independent implementation to test against: transformers' Qwen2 on tiny random configs."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from longctx.config import ModelConfig
from longctx.loading.checkpoint import Checkpoint


def tiny_hf_model(seed: int = 0, tie: bool = False, **overrides) -> Qwen2ForCausalLM:
    cfg = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attn_implementation="eager",
        initializer_range=0.25,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # HF inits biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def checkpoint_of(hf: Qwen2ForCausalLM) -> Checkpoint:
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return Checkpoint(
        config=config, tokenizer=None, source="tiny-hf", weights=lambda: iter(state.items())
    )


@torch.no_grad()
def hf_logprobs(hf: Qwen2ForCausalLM, ids: list[int]) -> torch.Tensor:
    """log-softmax of the next-token distribution at every position: [len(ids), vocab]."""
    logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def hf_greedy(hf: Qwen2ForCausalLM, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=steps,
        do_sample=False,
        min_new_tokens=steps,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(ids) :].tolist()


def random_checkpoint_with_real_tokenizer(seed: int = 3) -> Checkpoint:
    """A tiny random model over the default model's vocabulary, with its real tokenizer: for
    what needs real token texts (grammars, chat templates) but not a model that writes well."""
    from longctx.loading import load_checkpoint

    tokenizer = load_checkpoint(None).tokenizer
    hf = tiny_hf_model(seed=seed, vocab_size=151936, hidden_size=32, intermediate_size=32)
    ck = checkpoint_of(hf)
    return Checkpoint(ck.config, tokenizer, "tiny-random+real-tokenizer", ck.weights)
