"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny Llama model (seed 0), written once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))
