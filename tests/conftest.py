"""Session-wide fixtures shared by every test package.

Tests never contact a model hub: the offline switches are set here, before any test module
imports transformers (huggingface_hub reads them once, at import).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.tiny import write_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny Llama model (seed 0), written once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))
