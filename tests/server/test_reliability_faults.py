"""Real HTTP, engine faults through the test-only step hook (GENSERVE_FAULT_STEP_TOKEN, see
genserve.server.fault_injection): a failing step fails only its own requests, with TGI's generation
error (424 on /generate, an error event on a stream), logged; the server goes on serving, with the
same greedy answers; --max-consecutive-step-failures failing steps in a row end the process non-zero."""

from __future__ import annotations

import httpx
import pytest
from http_server import start_server
from reliability_helpers import StreamInThread, generated_ids, idle, save_tiny_model, wait_for

from genserve.server.fault_injection import FAULT_TOKEN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLEAN = "Count from 1 to 1000: 1, 2, 3,"
POISON_WORD = " zebra"  # its token, in a prompt, makes each step that carries the prompt fail


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-faults"), smollm2_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    poison = tok.encode(POISON_WORD, add_special_tokens=False)
    assert len(poison) == 1 and poison[0] not in tok.encode(CLEAN) + tok.encode("Hello")
    srv = start_server(tmp_path_factory.mktemp("serve-faults"), "--model-id", str(tiny_dir),
                       "--max-batch-size", "1", "--max-consecutive-step-failures", "2", "--num-threads", "1",
                       env={FAULT_TOKEN_ENV: str(poison[0])})
    yield srv
    srv.stop()


def _generate(url: str, prompt: str, n: int = 24) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}},
                      timeout=300)


def test_a_failing_step_fails_only_its_requests_and_the_server_goes_on(server):
    url = server.base_url
    expected = [t["id"] for t in _generate(url, CLEAN, 60).json()["details"]["tokens"]]
    # batch size 1: the clean stream runs alone; the poisoned request waits, then its own step fails
    clean = StreamInThread(url, {"inputs": CLEAN, "parameters": {"max_new_tokens": 60}})
    assert clean.first.wait(300)
    r = _generate(url, "Tell me about the" + POISON_WORD)
    assert r.status_code == 424, r.text
    assert r.json()["error_type"] == "generation"
    assert r.json()["error"].startswith("Request failed during generation: ")
    clean.join()
    assert clean.status == 200 and clean.events[-1]["generated_text"] is not None
    assert generated_ids(clean.events) == expected
    _serves_the_same(url, expected)  # successful steps: the count of failures in a row starts over
    stream = StreamInThread(url, {"inputs": "A" + POISON_WORD, "parameters": {"max_new_tokens": 8}}).join()
    assert stream.status == 200 and stream.events[-1]["error_type"] == "generation", stream.events
    assert "engine step failed" in server.log() and "InjectedStepFault" in server.log()
    _serves_the_same(url, expected)


def _serves_the_same(url: str, expected: list[int]) -> None:
    wait_for(lambda: idle(url), "an idle engine")
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    again = _generate(url, CLEAN, 60)
    assert again.status_code == 200 and [t["id"] for t in again.json()["details"]["tokens"]] == expected


def test_repeated_step_failures_end_the_process_non_zero(server):
    url = server.base_url
    first = _generate(url, "One" + POISON_WORD)
    assert first.status_code == 424
    assert server.proc.poll() is None and httpx.get(url + "/health", timeout=30).status_code == 200
    try:
        second = _generate(url, "Two" + POISON_WORD)
        assert second.status_code == 424, second.text  # the second failure in a row: the engine stops
    except httpx.HTTPError:
        pass  # or the process is already gone
    assert server.proc.wait(120) == 1, server.log()[-3000:]  # a cap only: Kubernetes restarts the pod
    assert "the engine stopped (InjectedStepFault): exiting with code 1" in server.log()
