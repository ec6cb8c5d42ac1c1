"""Speculative decoding (--speculate): n-gram drafts, their bookkeeping, and exact greedy output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import save_tiny_llama
from test_engine import make_engine
from test_scheduler import make_request, make_scheduler
from transformers import AutoTokenizer

from genserve.server import kernels
from genserve.server.sampling_params import SamplingParams
from genserve.server.speculation import NgramProposer, num_accepted

# repetitive text gives prompt lookup something to find, as code and quoting do in real traffic
PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Once upon a time",
    "Repeat the list: apple, banana, cherry, apple, banana, cherry, apple,",
]


def test_proposer_takes_the_longest_latest_match():
    proposer = NgramProposer(num_speculative_tokens=3)
    assert proposer.propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]
    # the 3-gram (7, 8, 9) wins over the later 1-gram match of 9
    assert proposer.propose([7, 8, 9, 5, 6, 9, 0, 7, 8, 9]) == [5, 6, 9]
    # latest occurrence first
    assert proposer.propose([5, 1, 5, 2, 5]) == [2, 5]
    assert proposer.propose([1, 2, 3]) == []
    assert proposer.propose([4]) == []
    assert NgramProposer(num_speculative_tokens=0).propose([1, 1, 1]) == []


def test_num_accepted_counts_the_leading_matches():
    assert num_accepted([5, 6, 7], [5, 6, 7, 8]) == 3
    assert num_accepted([5, 6, 7], [5, 9, 7, 8]) == 1
    assert num_accepted([5, 6, 7], [4, 6, 7, 8]) == 0


def _decode_ready(scheduler, request):
    """Prefill the request and sample its first token, so the next step is a decode."""
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, {request.request_id: [50]})
    assert request.num_tokens - request.num_computed_tokens == 1


def test_scheduler_keeps_matching_drafts_and_rolls_back_the_rest():
    s = make_scheduler(block_size=4)
    req = make_request("a", 6, max_new=20)
    _decode_ready(s, req)
    req.spec_token_ids = [60, 61, 62]
    out = s.schedule()
    (item,) = out.scheduled
    assert item.num_new_tokens == 4 and item.draft_token_ids == [60, 61, 62] and item.is_sampling
    assert len(req.block_ids) * 4 >= 7 + 3  # room for the drafts' KV
    # the model agrees with the first two drafts, then picks 99 instead of 62
    s.update_from_output(out, {"a": [60, 61, 99, 63]})
    assert req.token_ids[6:] == [50, 60, 61, 99]
    assert req.num_computed_tokens == req.num_tokens - 1 == 9
    assert (req.num_draft_tokens, req.num_accepted_tokens) == (3, 2)
    assert req.spec_token_ids == []
    # next step without drafts is a plain decode of the token the model picked
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 1 and out.scheduled[0].draft_token_ids == []


def test_scheduler_stops_inside_the_drafts_on_eos_and_length():
    s = make_scheduler(block_size=4)
    eos = make_request("eos", 6, max_new=20, eos=[2])
    _decode_ready(s, eos)
    eos.spec_token_ids = [2, 70, 71]
    out = s.schedule()
    s.update_from_output(out, {"eos": [2, 70, 71, 72]})
    assert eos.token_ids[6:] == [50, 2] and eos.finish_reason == "eos_token"
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks

    length = make_request("len", 6, max_new=3)
    _decode_ready(s, length)
    length.spec_token_ids = [80, 81, 82]
    out = s.schedule()
    s.update_from_output(out, {"len": [80, 81, 82, 83]})
    assert length.token_ids[6:] == [50, 80, 81] and length.finish_reason == "length"


def test_drafts_never_cause_preemption():
    s = make_scheduler(num_blocks=4, block_size=4)
    req, other = make_request("a", 7, max_new=20), make_request("b", 7, max_new=20, first_token=300)
    s.add_request(req)
    s.add_request(other)
    s.update_from_output(s.schedule(), {"a": [50], "b": [51]})  # 8 tokens each, in 2 blocks each: pool full
    req.spec_token_ids = [1, 2, 3, 4]  # would need a third block
    out = s.schedule()
    assert not out.preempted
    assert [(x.request.request_id, x.num_new_tokens, x.draft_token_ids) for x in out.scheduled[:1]] == [("a", 1, [])]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-spec"), smollm2_dir, num_kv_heads=2)


def _run_mixed(engine, prompts, greedy, sampled):
    """Greedy requests beside seeded sampled ones, half of them arriving mid-flight."""
    params = [greedy if i % 2 == 0 else sampled for i in range(len(prompts))]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3], strict=True)]
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    ids += [engine.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:], strict=True)]
    while engine.has_unfinished:
        for o in engine.step()[0]:
            tokens.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
    return [tokens[i] for i in ids]


class OracleProposer:
    """Drafts from the known answers, every third one wrong: kept, partly kept and refused drafts all
    occur (a random tiny model never repeats itself, so prompt lookup would find nothing)."""

    def __init__(self, num_speculative_tokens: int, answers: list[list[int]]):
        self.k = num_speculative_tokens
        self.answers = answers
        self.num_proposed = 0

    def propose(self, token_ids: list[int]) -> list[int]:
        n = len(token_ids)
        for answer in self.answers:
            if answer[:n] == token_ids:
                drafts = answer[n:n + self.k]
                if n % 3 == 0 and len(drafts) > 1:
                    drafts[1] = (drafts[1] + 1) % 1000
                self.num_proposed += len(drafts)
                return drafts
        return []


def test_tiny_llama_greedy_with_speculation_equals_without(tiny_dir, prompts):
    # head_dim 16: decodes take the gather + SDPA path (the SmolLM2 test below covers the native kernel)
    plain = make_engine(tiny_dir)
    greedy = SamplingParams(max_new_tokens=40)
    sampled = SamplingParams(max_new_tokens=40, do_sample=True, temperature=0.9, top_k=20, seed=7)
    penalised = SamplingParams(max_new_tokens=40, repetition_penalty=1.3, min_tokens=30)
    expected_alone = [plain.generate([p], greedy)[0] for p in prompts]
    expected_mixed = _run_mixed(plain, prompts, greedy, sampled)
    expected_penalised = plain.generate(prompts, penalised)
    answers = [p + out for p, out in zip(prompts + prompts, expected_alone + expected_penalised, strict=True)]
    for k in (2, 3, 5):
        engine = make_engine(tiny_dir, speculate=k)
        engine.proposer = OracleProposer(k, answers)
        assert [engine.generate([p], greedy)[0] for p in prompts] == expected_alone
        assert _run_mixed(engine, prompts, greedy, sampled) == expected_mixed
        assert engine.generate(prompts, penalised) == expected_penalised
        # several tokens per step are still counted one by one
        expected_total = sum(len(t) for t in expected_alone + expected_mixed + expected_penalised)
        assert engine.stats().num_generation_tokens_total == expected_total
        assert engine.proposer.num_proposed > 0
    # kept drafts mean fewer steps than tokens
    engine = make_engine(tiny_dir, speculate=4)
    engine.proposer = OracleProposer(4, answers)
    rid = engine.add_request(prompts[1], greedy)
    request = engine.scheduler.requests[rid]
    num_steps = 0
    while engine.has_unfinished:
        engine.step()
        num_steps += 1
    assert request.token_ids == answers[1]
    assert 0 < request.num_accepted_tokens < request.num_draft_tokens
    assert num_steps == 1 + 40 - 1 - request.num_accepted_tokens


@pytest.mark.slow
def test_smollm2_greedy_with_speculation_equals_without_and_stops_on_stop_sequences(smollm2_dir, prompts):
    plain = make_engine(smollm2_dir)
    spec = make_engine(smollm2_dir, speculate=4)
    assert spec.runner.use_paged_kernel == kernels.load_cpu_kernels()
    greedy = SamplingParams(max_new_tokens=48)
    expected = plain.generate(prompts, greedy)
    assert [spec.generate([p], greedy)[0] for p in prompts] == expected
    assert spec.generate(prompts, greedy) == expected
    stats = []
    # a stop sequence that falls inside a run of kept drafts ends the text there, as without drafts
    text = AutoTokenizer.from_pretrained(smollm2_dir).decode(expected[0])
    stop = text.split()[len(text.split()) // 2]
    params = SamplingParams(max_new_tokens=48, stop=[stop])
    ours, theirs = spec.add_request(prompts[0], params), plain.add_request(prompts[0], params)
    results = {}
    for engine in (spec, plain):
        while engine.has_unfinished:
            outputs, step = engine.step()
            stats.append(step)
            for o in outputs:
                if o.finished:
                    results[o.request_id] = (o.generated_text, o.finish_reason, o.num_generated_tokens)
    assert results[ours] == results[theirs] and results[ours][1] == "stop_sequence"
    assert sum(sum(s.num_accepted) for s in stats if s is not None) > 0


def test_bad_speculate_flags_are_one_line_errors(tiny_dir):
    genserve = str(Path(sys.executable).parent / "genserve")
    for extra in (["--speculate", "-1"], ["--speculate", "2", "--use-transformers-fallback"]):
        result = subprocess.run([genserve, "serve", "--model-id", str(tiny_dir), "--device", "cpu", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("genserve serve: error:") and "--speculate" in last, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_speculation_over_http_matches_transformers_alone_and_beside_other_requests(tmp_path):
    import asyncio

    import httpx
    from http_server import greedy_reference, start_server, text_ids

    server = start_server(tmp_path, "--speculate", "3")
    try:
        prompts = [text_ids(p) for p in PROMPTS]
        expected = [greedy_reference(ids, 32)[1] for ids in prompts]

        def body(text, **extra):
            return {"inputs": text, "parameters": {"max_new_tokens": 32, "details": True, **extra}}

        def ids_of(response):
            assert response.status_code == 200, response.text
            return [t["id"] for t in response.json()["details"]["tokens"]]

        # alone
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            assert [ids_of(client.post("/generate", json=body(p))) for p in PROMPTS] == expected

        # all at once, beside sampled requests (which never draft)
        async def together():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
                greedy = [client.post("/generate", json=body(p)) for p in PROMPTS]
                sampled = [client.post("/generate", json=body(p, do_sample=True, temperature=0.8, seed=i))
                           for i, p in enumerate(PROMPTS)]
                return await asyncio.gather(*greedy, *sampled)

        responses = asyncio.run(together())
        assert [ids_of(r) for r in responses[:len(PROMPTS)]] == expected
        assert all(r.status_code == 200 for r in responses[len(PROMPTS):])
        metrics = server.metrics()
        assert metrics["tgi_request_skipped_tokens_count"] > 0
        assert metrics["tgi_request_skipped_tokens_sum"] > 0
        assert metrics["genserve_spec_decode_acceptance_ratio_count"] == metrics["tgi_request_skipped_tokens_count"]
        assert 0 < metrics["genserve_spec_decode_accepted_tokens_total"] <= metrics["genserve_spec_decode_draft_tokens_total"]
    finally:
        server.stop()
