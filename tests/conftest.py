"""Shared pytest fixtures: the tiny generated models, built once per test session.

Tests run offline: the Hugging Face hub is switched off before anything imports transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of the tiny model of that arch (seed 0), for every arch in ``ARCHS``."""
    from tandem.tinymodel import ARCHS, make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(root / arch, arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    """Folder of the tiny Llama (seed 0)."""
    return tiny_model_dirs["llama"]
