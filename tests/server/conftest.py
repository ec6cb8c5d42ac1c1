from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from genserve.server.model_files import prepare_default_model

    return prepare_default_model()
