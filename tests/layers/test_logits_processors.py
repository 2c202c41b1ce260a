"""logit_bias and the penalties against a plain per-token reference of vLLM's formulas."""

import pytest
import torch

from longctx.errors import SamplingParamsError
from longctx.layers.logits_processors import SequenceLogitsState, process_logits
from longctx.layers.sampler import SampleRequest, sample
from longctx.sampling_params import SamplingParams

V = 64


def reference(row, prompt, output, params):
    x = row.clone()
    for t, b in (params.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(output):
        p = params.repetition_penalty
        x[t] = x[t] / p if x[t] > 0 else x[t] * p
    for t in set(output):
        x[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return x


CASES = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(frequency_penalty=0.8),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(presence_penalty=0.5, frequency_penalty=-0.4, repetition_penalty=1.2),
    SamplingParams(logit_bias={3: 5.0, 7: -100.0}, frequency_penalty=1.0),
]


@pytest.mark.parametrize("params", CASES)
def test_matches_the_reference(params):
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    prompts = [[1, 2, 3, 2], [5], [9, 10, 11]]
    outputs = [[3, 3, 4], [], [10, 20, 20, 20]]
    states = [
        SequenceLogitsState.build(params, p, o, V, torch.device("cpu"))
        for p, o in zip(prompts, outputs)
    ]
    got = process_logits(logits, [params] * 3, states)
    for r in range(3):
        torch.testing.assert_close(got[r], reference(logits[r], prompts[r], outputs[r], params))


def test_rows_without_state_are_untouched_and_input_is_not_modified():
    logits = torch.randn(2, V)
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(presence_penalty=2.0)]
    state = SequenceLogitsState.build(params[1], [0], [1, 2], V, torch.device("cpu"))
    got = process_logits(logits, params, [None, state])
    assert torch.equal(logits, before) and torch.equal(got[0], before[0])
    assert got[1, 1] == before[1, 1] - 2.0


def test_sampling_counts_each_chosen_token_on_the_device():
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    state = SequenceLogitsState.build(params, [0], [], V, torch.device("cpu"))
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 3.0, 2.5
    picks = [
        sample(logits, [SampleRequest(params, None, state)]).result().token_ids[0] for _ in range(3)
    ]
    # 5 wins once (3.0 - 2 = 1.0 < 2.5), then 6 (2.5 - 2 = 0.5 < 1.0), then 5 again.
    assert picks == [5, 6, 5]
    assert state.output_counts[5] == 2 and state.output_counts[6] == 1


def test_logprobs_stay_those_of_the_model():
    params = SamplingParams(temperature=0, logprobs=1, logit_bias={2: 50.0})
    state = SequenceLogitsState.build(params, [0], [], V, torch.device("cpu"))
    logits = torch.randn(1, V)
    res = sample(logits, [SampleRequest(params, None, state)]).result()
    assert res.token_ids == [2]
    assert res.logprobs[0][2] == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
        {"repetition_penalty": 5e-324},
        {"repetition_penalty": 1e300},
        {"logit_bias": {1: 101}},
        {"logit_bias": {-1: 1}},
        {"logit_bias": {"x": 1}},
    ],
)
def test_out_of_range_values_are_refused(kwargs):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
