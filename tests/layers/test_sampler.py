import pytest
import torch

from longctx.layers.sampler import SampleRequest, _filtered_probs, sample
from longctx.sampling_params import SamplingParams


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(3, 50)
    req = SampleRequest(SamplingParams(temperature=0, logprobs=4), None)
    res = sample(logits.clone(), [req] * 3).to_host().result()
    assert res.token_ids == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for r in range(3):
        assert len(res.logprobs[r]) == 4  # chosen token is among the top 4
        for tok, lp in res.logprobs[r].items():
            assert abs(lp - ref[r, tok].item()) < 1e-6
        assert set(res.logprobs[r]) == set(ref[r].topk(4).indices.tolist())


def test_logprobs_include_chosen_token_outside_top_n():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    req = SampleRequest(SamplingParams(temperature=1.0, top_k=1, logprobs=0), gen(0))
    res = sample(logits, [req]).result()
    assert res.token_ids == [1] and list(res.logprobs[0]) == [1]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = _filtered_probs(logits, SamplingParams(top_k=2))
    assert (p[2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    soft = torch.softmax(logits, -1)  # 0.644, 0.237, 0.087, 0.032
    p = _filtered_probs(logits, SamplingParams(top_p=0.85))
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    assert abs(p[0].item() - soft[0].item() / soft[:2].sum().item()) < 1e-6
    p = _filtered_probs(logits, SamplingParams(top_p=0.01))
    assert p[0] == 1.0


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    req = SampleRequest(SamplingParams(temperature=1.0), gen(1))
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits[None].clone(), [req]).result().token_ids[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_seeded_rows_do_not_depend_on_the_batch(temperature):
    logits = torch.randn(4, 100)
    params = SamplingParams(temperature=temperature)
    alone = sample(logits[2:3].clone(), [SampleRequest(params, gen(7))]).result().token_ids[0]
    reqs = [SampleRequest(params, gen(s)) for s in (1, 2, 7, 3)]
    assert sample(logits.clone(), reqs).result().token_ids[2] == alone


def test_mixed_logprob_widths_keep_each_rows_own_n():
    logits = torch.randn(3, 40)
    reqs = [
        SampleRequest(SamplingParams(temperature=0, logprobs=5), None),
        SampleRequest(SamplingParams(temperature=0), None),
        SampleRequest(SamplingParams(temperature=0, logprobs=1), None),
    ]
    res = sample(logits.clone(), reqs).to_host().result()
    ref = torch.log_softmax(logits, -1)
    assert res.logprobs[1] is None
    assert set(res.logprobs[0]) == set(ref[0].topk(5).indices.tolist())
    assert set(res.logprobs[2]) == {int(ref[2].argmax())}


@pytest.mark.parametrize(
    "temperature,top_p", [(4.9e-147, 1.0), (1e-300, 0.5), (1.0, 5e-324), (1e-320, 5e-324)]
)
def test_extreme_temperature_and_top_p_still_sample_the_top_token(temperature, top_p):
    # Found by fuzzing the server: these underflow float32 (softmax of inf, an empty nucleus).
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    probs = _filtered_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert torch.isfinite(probs).all() and probs.argmax().item() == 1
    req = SampleRequest(SamplingParams(temperature=temperature, top_p=top_p), gen(0))
    assert sample(logits[None], [req]).result().token_ids == [1]
