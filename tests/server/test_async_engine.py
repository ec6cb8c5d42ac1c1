"""The async engine's failure handling, on a tiny real model with a fault injected into step()."""

from __future__ import annotations

import asyncio
import threading

import pytest
from model_helpers import save_tiny_llama

from genserve.server.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine, EngineDeadError
from genserve.server.config import EngineConfig
from genserve.server.sampling_params import SamplingParams


@pytest.fixture
def tiny_engine(tmp_path, smollm2_dir):
    path = save_tiny_llama(tmp_path / "tiny", smollm2_dir, num_kv_heads=2)
    return AsyncEngine.from_config(EngineConfig(model_id=str(path), dtype="float32", max_total_tokens=256,
                                                max_batch_total_tokens=2048))


async def collect(engine, prompt=(1, 2, 3), max_new_tokens=4):
    return [o async for o in engine.generate(list(prompt), SamplingParams(max_new_tokens=max_new_tokens))]


async def test_one_failed_step_fails_its_batch_and_the_engine_keeps_serving(tiny_engine):
    await tiny_engine.start()
    real_step = tiny_engine.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real_step()

    tiny_engine.engine.step = flaky_step
    with pytest.raises(RuntimeError, match="generation failed: injected"):
        await collect(tiny_engine)
    outputs = await collect(tiny_engine)
    assert outputs[-1].finished and outputs[-1].num_generated_tokens == 4
    assert tiny_engine.error is None
    assert tiny_engine.engine.kv_cache.num_used_blocks == 0
    await tiny_engine.shutdown()


async def test_repeated_failures_stop_the_engine_and_fail_new_requests(tiny_engine):
    await tiny_engine.start()

    def broken_step():
        raise RuntimeError("device lost")

    tiny_engine.engine.step = broken_step
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(collect(tiny_engine), 10)
    for _ in range(50):
        if tiny_engine.error is not None:
            break
        await asyncio.sleep(0.02)
    assert isinstance(tiny_engine.error, RuntimeError)
    assert not tiny_engine.is_live()  # /live: 503
    with pytest.raises(EngineDeadError):
        await collect(tiny_engine)
    await tiny_engine.shutdown()


async def test_a_step_that_hangs_makes_the_engine_not_live_until_it_returns(tiny_engine):
    await tiny_engine.start()
    assert tiny_engine.is_live()
    tiny_engine.wedged_step_seconds = 0.2
    entered, release = threading.Event(), threading.Event()
    real_step = tiny_engine.engine.step

    def hanging_step():
        entered.set()
        release.wait(300)
        return real_step()

    tiny_engine.engine.step = hanging_step
    outputs = asyncio.ensure_future(collect(tiny_engine))
    for what, predicate in [("the step to begin", entered.is_set),
                            ("the hung step to count as wedged", lambda: not tiny_engine.is_live())]:
        for _ in range(6000):  # a generous cap (120 s) for a busy machine
            if predicate():
                break
            await asyncio.sleep(0.02)
        assert predicate(), what
    tiny_engine.engine.step = real_step
    release.set()
    assert (await asyncio.wait_for(outputs, 300))[-1].finished
    assert tiny_engine.is_live()
    await tiny_engine.shutdown()
