"""``random:NAME`` model specs: the folder they resolve to (pure; no torch)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tandem import random_model
from tandem.config import ModelConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_every_stored_config_parses():
    names = random_model.available()
    assert {"llama-3-8b", "qwen3-8b", "mistral-7b"} <= set(names)
    for name in names:
        cfg = ModelConfig.from_hf_dict(random_model.hf_config(name))
        assert cfg.num_params() > 0


def test_llama3_8b_has_8b_parameters():
    cfg = ModelConfig.from_hf_dict(random_model.hf_config("llama-3-8b"))
    assert 8.0e9 < cfg.num_params() < 8.1e9  # 8.03 B


def test_resolve_writes_a_model_folder_once(cache):
    path = random_model.resolve_model("random:llama-3-debug")
    assert path.startswith(str(cache))
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.vocab_size == 128256 and cfg.eos_token_ids == (1, 5)
    assert random_model.random_weights(path) == {"name": "llama-3-debug", "seed": 0, "std": 0.02}
    vocab = json.loads((cache / path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 128256 and vocab["<r128255>"] == 128255
    assert random_model.resolve_model("random:llama-3-debug") == path
    assert random_model.resolve_model("/some/folder") == "/some/folder"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown random model 'nope'.*llama-3-8b"):
        random_model.resolve_model("random:nope")


def test_cli_names_the_flag_for_an_unknown_random_model(cache):
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "generate", "--model", "random:nope", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown random model 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_resolved_folder_is_readable_by_others_whatever_the_umask(cache):
    old = os.umask(0o077)
    try:
        path = Path(random_model.resolve_model("random:llama-3-debug"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # mkdtemp made it 0700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644), modes
