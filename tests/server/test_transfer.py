"""Host-device traffic of an engine step, counted: one copy in, at most one copy out, no hidden syncs.

On CPU nothing actually waits, so the test counts what would make a CUDA step wait: device -> host
copies (`.cpu()`), reads of tensor values on the host (`.item()`, `.tolist()`, int()/float()/bool()),
ops whose output size depends on tensor values (nonzero, boolean indexing, repeat_interleave without
output_size), and tensors built from host data (each a host -> device copy on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import save_tiny_llama
from test_engine import make_engine
from torch.utils._python_dispatch import TorchDispatchMode

from genserve.server.grammar import GrammarCompiler, GrammarSpec
from genserve.server.sampling_params import SamplingParams
from genserve.server.transfer import HostBatch, to_host


class StepTraffic(TorchDispatchMode):
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.copies_out = 0
        self.host_reads: list[str] = []
        self.value_dependent: list[str] = []
        self.host_tensors = 0
        counter = self

        def counting(name, original):
            def method(self, *args, **kwargs):
                if name == "cpu":
                    counter.copies_out += 1
                else:
                    counter.host_reads.append(name)
                return original(self, *args, **kwargs)
            return method

        for name in ("cpu", "tolist", "item"):
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.host_reads.append("_local_scalar_dense")
        elif name in ("nonzero", "masked_select", "unique", "_unique2") or (
                name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3):
            self.value_dependent.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.value_dependent.append(f"{name} with a bool mask")
        elif name == "lift_fresh":
            self.host_tensors += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-syncs"), smollm2_dir, num_kv_heads=2)


def step_traffic(engine) -> list[tuple[StepTraffic, int]]:
    """Every step until the engine is idle, each with its traffic and its number of sampled rows."""
    steps = []
    while engine.has_unfinished:
        with pytest.MonkeyPatch.context() as patch, StepTraffic(patch) as traffic:
            outputs, _ = engine.step()
        steps.append((traffic, sum(len(o.new_tokens) for o in outputs)))
    return steps


MIXES = {
    "greedy": [SamplingParams(max_new_tokens=4)],
    "sampled": [SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1,
                               top_n_tokens=3, repetition_penalty=1.2, frequency_penalty=0.3),
                SamplingParams(max_new_tokens=4, typical_p=0.7, seed=2, logit_bias={5: 2.0}, min_tokens=2),
                SamplingParams(max_new_tokens=4)],
    "prompt logprobs": [SamplingParams(max_new_tokens=3, prompt_logprobs=True, top_n_tokens=2),
                        SamplingParams(max_new_tokens=3, do_sample=True, seed=3)],
    "grammar": [SamplingParams(max_new_tokens=4, grammar=GrammarSpec("regex", "[a-z ]+")),
                SamplingParams(max_new_tokens=4, do_sample=True, seed=4)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_a_step_copies_once_each_way_whatever_the_batch(mix, tiny_dir):
    if mix == "grammar" and not GrammarCompiler.available():
        pytest.skip("llguidance is not installed")
    engine = make_engine(tiny_dir, max_batch_prefill_tokens=64)
    host_tensors_per_step = set()
    for batch in (1, 4, 9):
        for i in range(batch):
            engine.add_request(list(range(10 + i, 30 + 3 * i)), MIXES[mix][i % len(MIXES[mix])])
        steps = step_traffic(engine)
        assert len(steps) >= 3
        for traffic, num_sampled in steps:
            assert traffic.host_reads == [] and traffic.value_dependent == []
            assert traffic.copies_out <= 1 and traffic.copies_out >= (num_sampled > 0)
            host_tensors_per_step.add(traffic.host_tensors)
    # the step's payload, plus the sampler's parameters when any row needs them (and a grammar's mask, made
    # on the host): never more with more rows
    assert max(host_tensors_per_step) <= {"greedy": 1, "grammar": 3}.get(mix, 2)


def test_to_host_and_host_batch_round_trip():
    ids = torch.tensor([[3, 49151], [0, 7]])
    values = torch.tensor([-0.125, 1.0e-30, 3.4e38], dtype=torch.float32)
    rows, flat = to_host([ids, values])
    assert rows == [[3, 49151], [0, 7]] and flat == values.tolist()
    batch = HostBatch()
    first = batch.add([1, 2, 2**40], torch.long)
    second = batch.add([0.1, -2.5])
    tensors = batch.to(torch.device("cpu"))
    assert tensors[first].dtype == torch.long and tensors[first].tolist() == [1, 2, 2**40]
    assert torch.equal(tensors[second], torch.tensor([0.1, -2.5]))  # float32, rounded as torch.tensor does


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_synchronizes_once(tiny_dir):
    import warnings

    engine = make_engine(tiny_dir, device="cuda", cuda_graphs="0")
    for i in range(6):
        engine.add_request(list(range(10 + i, 40 + i)), MIXES["sampled"][i % 3])
    engine.step()
    engine.step()
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while engine.has_unfinished:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert counts and max(counts) == 1, counts  # the one copy out


def test_step_layout_reads_back_what_pack_step_wrote():
    """The payload's sections, cut by StepLayout from the header alone, are the lists pack_step packed."""
    from genserve.server.request import Request
    from genserve.server.sampling_params import SamplingParams
    from genserve.server.scheduler import ScheduledRequest, SchedulerOutput
    from genserve.server.step_payload import HEADER_SIZE, StepHeader, StepLayout, pack_step

    decode = Request("d", list(range(40)), SamplingParams(), max_new_tokens=4)
    decode.num_computed_tokens, decode.block_ids = 39, [7, 3, 9]
    prefill = Request("p", list(range(100, 130)), SamplingParams(prompt_logprobs=True), max_new_tokens=4)
    prefill.num_computed_tokens, prefill.block_ids = 16, [1, 2]
    out = SchedulerOutput(scheduled=[ScheduledRequest(decode, 1), ScheduledRequest(prefill, 14)])
    header, values, order, _ = pack_step(out, 16)
    assert len(header.to_list()) == HEADER_SIZE and StepHeader.from_list(header.to_list()) == header
    assert StepHeader.from_list([0] * HEADER_SIZE) is None
    at = StepLayout.of(header)
    assert values[at.input_ids] == [39, *range(116, 130)]
    assert values[at.positions] == [39, *range(16, 30)]
    assert values[at.sample_rows] == [0, 14] and [s.request.request_id for s in order] == ["d", "p"]
    assert values[at.decode_lens] == [40]
    assert values[at.decode_slots] == [9 * 16 + 7]  # position 39: block 2 of [7, 3, 9] (9), offset 7
    assert values[at.prefill_begins] == [16] and values[at.prefill_ends] == [30]
    assert values[at.decode_tables] == [7, 3, 9]
    assert values[at.prefill_blocks] == [1, 2]
    # the chunk's positions 16..28 score prompt tokens 17..29 (the last prompt position samples instead)
    assert values[at.prompt_rows] == list(range(1, 14)) and values[at.prompt_token_ids] == list(range(117, 130))
    assert at.prompt_token_ids.stop == header.payload_len == len(values)
