import math

import pytest
import torch

from genserve.server.sampler import Sampler, SamplingRow, apply_penalties, make_generator
from genserve.server.sampling_params import SamplingParams


def row(seed=None, tokens=(), num_prompt_tokens=0, **kwargs) -> SamplingRow:
    params = SamplingParams(seed=seed, **kwargs)
    generator = make_generator(seed) if seed is not None else None
    return SamplingRow(params=params, generator=generator, token_ids=list(tokens), num_prompt_tokens=num_prompt_tokens)


def draw_many(logits: torch.Tensor, num_draws: int, seed: int = 0, **kwargs) -> list[int]:
    """Sample `num_draws` times from one logits row, as a batch of identical rows with different seeds."""
    rows = [row(seed=seed + i, **kwargs) for i in range(num_draws)]
    return Sampler()(logits.expand(num_draws, -1), rows).token_ids


def test_greedy_is_argmax_with_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    logits[3, 7] = logits[3, 42] = 50.0
    result = Sampler()(logits, [row() for _ in range(8)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.token_ids[3] == 7
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert result.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.top_tokens == [[] for _ in range(8)]


def test_bf16_logits_computed_in_float32():
    logits = torch.randn(4, 50).to(torch.bfloat16)
    result = Sampler()(logits, [row() for _ in range(4)])
    assert result.token_ids == logits.float().argmax(dim=-1).tolist()


def test_temperature_zero_is_greedy_even_with_do_sample():
    logits = torch.randn(3, 30)
    result = Sampler()(logits, [row(seed=1, do_sample=True, temperature=0.0) for _ in range(3)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_repetition_penalty_matches_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.9, -3.0]])
    # prompt + output tokens both count; 0 and 1 are penalised
    r = row(tokens=[0, 1, 1], num_prompt_tokens=2, repetition_penalty=2.0, top_n_tokens=0)
    penalised = torch.tensor([[1.0, -2.0, 0.5, 1.9, -3.0]])
    assert Sampler()(logits, [r]).token_ids == [3]
    assert penalised.argmax().item() == 3


def test_frequency_and_presence_penalty_use_generated_tokens_only():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]])
    # token 0 only in the prompt: not penalised; token 1 generated twice, token 2 once
    r = row(tokens=[0, 1, 2, 1], num_prompt_tokens=1, frequency_penalty=0.5, presence_penalty=0.3)
    expected = torch.tensor([[3.0, 2.9 - 2 * 0.5 - 0.3, 2.8 - 0.5 - 0.3, 0.0]])
    result = Sampler()(logits, [r])
    assert result.token_ids == [0]
    # logprob stays the raw model's distribution
    assert result.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item(), abs=1e-6)
    # a negative frequency penalty favours repeats
    r2 = row(tokens=[0, 2, 2], num_prompt_tokens=1, frequency_penalty=-0.2)
    assert Sampler()(logits, [r2]).token_ids == [2]
    assert (expected[0, 2] < expected[0, 0]).item()


def test_penalties_vectorised_across_rows_match_single_rows():
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    rows = [
        row(tokens=[1, 2, 3, 4], num_prompt_tokens=2, repetition_penalty=1.3),
        row(),
        row(tokens=[5, 5, 6], num_prompt_tokens=0, frequency_penalty=1.0, presence_penalty=-0.5),
        row(tokens=list(range(20)), num_prompt_tokens=10, repetition_penalty=0.7, frequency_penalty=0.4),
        row(tokens=[39, 39], num_prompt_tokens=1, presence_penalty=2.0),
    ]
    batched = Sampler()(logits, rows).token_ids
    alone = [Sampler()(logits[i : i + 1], [rows[i]]).token_ids[0] for i in range(5)]
    assert batched == alone
    # reference for row 3
    ref = logits[3].clone()
    for t in range(20):
        ref[t] = ref[t] * 0.7 if ref[t] < 0 else ref[t] / 0.7
    ref[10:20] -= 0.4
    assert batched[3] == ref.argmax().item()


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.9, 2.8, 1.0]])
    draws = draw_many(logits, 2000, top_k=3, do_sample=True)
    assert set(draws) == {0, 1, 2}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed; the fourth is not
    draws = draw_many(logits, 3000, top_p=0.8)
    assert set(draws) == {0, 1, 2}
    draws = draw_many(logits, 500, top_p=0.4)
    assert set(draws) == {0}


def test_top_k_then_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # after top_k=2 the renormalised probs are 4/7, 3/7; top_p=0.5 keeps only the first
    assert set(draw_many(logits, 500, top_k=2, top_p=0.5)) == {0}
    assert set(draw_many(logits, 2000, top_k=3, top_p=0.99)) == {0, 1, 2}


def _hf_typical_support(logits: torch.Tensor, mass: float) -> set[int]:
    from transformers.generation.logits_process import TypicalLogitsWarper

    warped = TypicalLogitsWarper(mass=mass)(None, logits.clone())
    return set(torch.nonzero(warped[0] > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9])
def test_typical_p_matches_hf_support(mass):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0]])
    expected = _hf_typical_support(logits, mass)
    draws = draw_many(logits, 3000, typical_p=mass)
    assert set(draws) <= expected
    # every kept token with a reasonable probability shows up
    probs = torch.softmax(logits[0, sorted(expected)], -1)
    assert set(draws) == {t for t, p in zip(sorted(expected), probs.tolist(), strict=True) if p > 0.01}


def test_temperature_distribution_chi_square():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    temperature = 0.7
    n = 6000
    draws = draw_many(logits, n, temperature=temperature)
    expected = torch.softmax(logits[0] / temperature, -1) * n
    observed = torch.bincount(torch.tensor(draws), minlength=4).float()
    chi2 = (((observed - expected) ** 2) / expected).sum().item()
    # 3 degrees of freedom: p < 0.001 above 16.3
    assert chi2 < 16.3


def test_seeded_rows_are_batch_independent():
    torch.manual_seed(2)
    vocab = 300
    logits = torch.randn(6, vocab)
    target = row(seed=1234, temperature=0.9, top_k=50, top_p=0.95, tokens=[1, 2, 3], num_prompt_tokens=1,
                 repetition_penalty=1.1)
    alone = []
    for step in range(20):
        step_logits = logits[step % 6 : step % 6 + 1]
        alone.append(Sampler()(step_logits, [target]).token_ids[0])
    target.generator = make_generator(1234)
    batched = []
    for step in range(20):
        others = [
            row(),
            row(seed=step, do_sample=True),
            row(seed=99, typical_p=0.5, presence_penalty=0.5, tokens=[4, 5], num_prompt_tokens=1),
            row(top_n_tokens=3),
        ]
        position = step % 5
        rows = others[:position] + [target] + others[position:]
        noise = torch.randn(4, vocab)
        batch = torch.cat([noise[:position], logits[step % 6 : step % 6 + 1], noise[position:]])
        batched.append(Sampler()(batch, rows).token_ids[position])
    assert batched == alone
    assert len(set(alone)) > 1


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)
    a = [Sampler()(logits, [row(seed=7, do_sample=True)]).token_ids[0] for _ in range(3)]
    assert len(set(a)) == 1
    b = draw_many(logits, 20, seed=100, do_sample=True)
    assert len(set(b)) > 10


def test_logprobs_and_top_n_are_raw_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(3, 64)
    rows = [
        row(top_n_tokens=5, repetition_penalty=3.0, tokens=[int(logits[0].argmax())], num_prompt_tokens=1),
        row(seed=5, temperature=1.5, top_n_tokens=2),
        row(),
    ]
    result = Sampler()(logits, rows)
    log_probs = torch.log_softmax(logits, -1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(log_probs[i, token].item(), abs=1e-5)
    values, ids = log_probs.topk(5, dim=-1)
    assert [t for t, _ in result.top_tokens[0]] == ids[0].tolist()
    assert [lp for _, lp in result.top_tokens[0]] == pytest.approx(values[0].tolist(), abs=1e-5)
    assert [t for t, _ in result.top_tokens[1]] == ids[1, :2].tolist()
    assert result.top_tokens[2] == []
    # the penalised argmax moved away from the raw argmax
    assert result.token_ids[0] != int(logits[0].argmax())
    assert math.isfinite(result.logprobs[1])


def test_token_ids_beyond_logits_vocab_are_ignored():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    r = row(tokens=[1, 7, 100], num_prompt_tokens=1, repetition_penalty=4.0, frequency_penalty=1.0)
    assert Sampler()(logits, [r]).token_ids == [0]


def test_apply_penalties_values_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.9, -3.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, -1.0, 2.0, 4.0]])
    rows = [
        row(tokens=[0, 1, 1], num_prompt_tokens=2, repetition_penalty=2.0),
        row(tokens=[0, 1, 2, 1], num_prompt_tokens=1, frequency_penalty=0.5, presence_penalty=0.3),
        row(tokens=[4, 2, 2, 0], num_prompt_tokens=2, repetition_penalty=0.5, frequency_penalty=-1.0,
            presence_penalty=1.5),
    ]
    expected = torch.tensor([
        [1.0, -2.0, 0.5, 1.9, -3.0],
        [1.0, 1.0 - 1.0 - 0.3, 1.0 - 0.5 - 0.3, 1.0, 1.0],
        # repetition over 4,2,0 first (x2 / x0.5), then generated 2,0 get -(-1)*count - 1.5
        [0.0 + 1.0 - 1.5, 1.0, -0.5 + 1.0 - 1.5, 2.0, 8.0],
    ])
    assert torch.allclose(apply_penalties(logits, rows), expected)
    assert torch.equal(logits[1], torch.ones(5))  # input untouched


def test_top_k_alone_in_a_mixed_batch():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.9, 2.8, 1.0]])
    rows = [row(seed=i, top_k=2) for i in range(500)] + [row(seed=i, do_sample=True) for i in range(500)]
    draws = Sampler()(logits.expand(1000, -1), rows).token_ids
    assert set(draws[:500]) == {0, 1}
    assert len(set(draws[500:])) > 2


def test_logit_bias_bans_and_forces_tokens_per_row():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    best = logits.argmax(-1).tolist()
    rows = [row(logit_bias={best[0]: -100.0}), row(logit_bias={7: 100.0, 8: -3.0}), row()]
    result = Sampler()(logits, rows)
    banned = logits[0].clone()
    banned[best[0]] -= 100
    assert result.token_ids == [int(banned.argmax()), 7, best[2]]
    # sampled rows see the bias too: +100 leaves nothing else a chance
    assert set(draw_many(logits[1:2], 20, logit_bias={11: 100.0}, do_sample=True)) == {11}
    assert torch.equal(logits.argmax(-1), torch.tensor(best))  # the input logits are never modified in place


def test_logit_bias_range_is_checked():
    with pytest.raises(ValueError, match="`logit_bias` values must be >= -100 and <= 100"):
        SamplingParams(logit_bias={1: 101.0}).validate()


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, 20)
    logits[:, 2] = 10.0  # EOS would win
    logits[:, 5] = 8.0  # a stop token id next
    logits[:, 9] = 1.0
    short = SamplingRow(params=SamplingParams(min_tokens=3, stop_token_ids=[5]), generator=None,
                        token_ids=[1, 1, 7], num_prompt_tokens=2, eos_token_ids=frozenset({2}))
    done = SamplingRow(params=SamplingParams(min_tokens=1, stop_token_ids=[5]), generator=None,
                       token_ids=[1, 1, 7], num_prompt_tokens=2, eos_token_ids=frozenset({2}))
    assert Sampler()(logits, [short, done]).token_ids == [9, 2]
    with pytest.raises(ValueError, match="`min_tokens` must be >= 0 and <= `max_new_tokens`"):
        SamplingParams(min_tokens=5, max_new_tokens=4).validate()


def _hf_min_p_support(logits: torch.Tensor, temperature: float, min_p: float) -> set[int]:
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    warped = MinPLogitsWarper(min_p=min_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    return set(torch.nonzero(warped[0] > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("temperature, min_p", [(1.0, 0.1), (0.7, 0.3), (1.5, 0.05)])
def test_min_p_matches_hf_support(temperature, min_p):
    logits = torch.tensor([[3.0, 2.5, 1.8, 1.0, 0.2, -0.5, -2.0]])
    expected = _hf_min_p_support(logits, temperature, min_p)
    assert 1 < len(expected) < logits.shape[1]
    draws = draw_many(logits, 3000, temperature=temperature, min_p=min_p)
    assert set(draws) <= expected
    probs = torch.softmax(logits[0, sorted(expected)] / temperature, -1)
    assert set(draws) == {t for t, p in zip(sorted(expected), probs.tolist(), strict=True) if p > 0.01}


def test_min_p_alone_makes_a_request_sampled_and_is_checked():
    assert not SamplingParams(min_p=0.1).is_greedy
    assert SamplingParams(min_p=0.1, temperature=0).is_greedy
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="`min_p` must be >= 0.0 and <= 1.0"):
            SamplingParams(min_p=bad).validate()


def test_allowed_token_ids_restrict_greedy_and_sampled_rows_only():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    allowed = [4, 17, 33]
    rows = [row(allowed_token_ids=allowed), row(), row(allowed_token_ids=[9])]
    result = Sampler()(logits, rows)
    assert result.token_ids == [allowed[int(logits[0, allowed].argmax())], int(logits[1].argmax()), 9]
    # the logprob is over the allowed tokens (the mask comes before everything, as grammars)
    assert result.logprobs[2] == pytest.approx(0.0, abs=1e-6)
    assert set(draw_many(logits[0:1], 400, allowed_token_ids=allowed, do_sample=True)) == set(allowed)
    with pytest.raises(ValueError, match="`allowed_token_ids` must not be empty"):
        SamplingParams(allowed_token_ids=[]).validate()


def test_bad_words_ban_single_tokens_and_the_last_token_after_a_prefix():
    logits = torch.zeros(3, 10)
    logits[:, 6] = 5.0  # the favourite
    logits[:, 2] = 4.0
    words = [[6]], [[3, 6]], [[3, 4, 6]]
    rows = [SamplingRow(SamplingParams(bad_words_token_ids=words[0]), None, [1, 3], 1),
            SamplingRow(SamplingParams(bad_words_token_ids=words[1]), None, [1, 3], 1),  # output ends with 3
            SamplingRow(SamplingParams(bad_words_token_ids=words[2]), None, [1, 3], 1)]  # needs 3, 4 first
    assert Sampler()(logits, rows).token_ids == [2, 2, 6]
    assert rows[2].banned_token_ids() == set()
    # the prefix is matched on the output only, not the prompt
    assert SamplingRow(SamplingParams(bad_words_token_ids=[[3, 6]]), None, [3], 1).banned_token_ids() == set()
    with pytest.raises(ValueError, match="`bad_words` must not contain empty words"):
        SamplingParams(bad_words_token_ids=[[]]).validate()


def test_native_greedy_pick_matches_argmax_and_logsumexp():
    from genserve.server import kernels

    if not kernels.load_cpu_kernels():
        pytest.skip("native CPU kernels unavailable")
    torch.manual_seed(0)
    logits = torch.randn(5, 49152) * 4
    logits[1, 100:] = float("-inf")  # banned tokens (min_tokens, allowed_token_ids) are -inf
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the first one, as torch.argmax
    logits[3] = float("-inf")  # nothing allowed: logsumexp is -inf too
    picked, lse = kernels.greedy_pick(logits)
    ids = picked[:, 0].long()
    assert torch.equal(ids[:3], logits[:3].argmax(-1)) and ids[2] == 7 and ids[3] == 0
    # the log-probability as the sampler reported it before: float32 logit - lse, then widened
    logprobs = (logits.gather(1, ids[:, None]).squeeze(1) - lse).double()
    assert torch.equal(picked[[0, 1, 2, 4], 1], logprobs[[0, 1, 2, 4]])
    assert torch.allclose(lse[[0, 1, 2, 4]], torch.logsumexp(logits[[0, 1, 2, 4]], -1), rtol=1e-6, atol=1e-5)
    assert lse[3] == float("-inf")
    with pytest.raises(RuntimeError, match="float32"):
        kernels.greedy_pick(logits.double())
