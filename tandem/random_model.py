"""Full-size model shapes with random weights, built on the device without a download.

``--model random:NAME`` serves the architecture of a well-known model (``NAME`` is a file
of ``tandem/model_configs``, for example ``llama-3-8b``) with random weights, for
benchmarks. ``resolve_model(spec)`` turns the spec into an ordinary model folder under the
cache directory — the Hugging Face ``config.json``, a tokenizer, a chat template — plus the
marker file ``RANDOM_WEIGHTS_FILE``, which tells the loader to initialise weights on the
device (seeded) instead of reading safetensors. Everything else (router, tokenizer, KV
sizing, compat hashes) sees a normal folder.

The tokenizer is the bundled tiny model's byte-level BPE with its vocabulary padded to the
model's ``vocab_size`` by tokens ``<rN>``: prompts tokenize to real ids, and every id the
random model emits decodes to text. Its special ids (bos 0, eos 1, ``<|im_end|>`` 5)
replace the original model's in the written config. Pure: no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

RANDOM_PREFIX = "random:"
RANDOM_WEIGHTS_FILE = "tandem_random_weights.json"


def available() -> list[str]:
    """Names accepted after ``random:``."""
    folder = resources.files("tandem") / "model_configs"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def is_random_spec(model: str | None) -> bool:
    return model is not None and str(model).startswith(RANDOM_PREFIX)


def hf_config(name: str) -> dict:
    """The stored Hugging Face config of ``name``; ValueError naming the choices."""
    if name not in available():
        raise ValueError(f"unknown random model {name!r}; available: {', '.join(available())}")
    text = (resources.files("tandem") / "model_configs" / f"{name}.json").read_text()
    return json.loads(text)


def resolve_model(model: str, seed: int = 0) -> str:
    """A folder for ``model``: itself unless it is ``random:NAME``, which is materialised
    once under the cache directory (atomically: concurrent workers may race to build it)."""
    if not is_random_spec(model):
        return model
    from tandem import env
    from tandem.tinymodel import tokenizer as tk
    from tandem.tinymodel.files import make_readable

    name = model[len(RANDOM_PREFIX) :]
    config = hf_config(name)
    out = env.cache_dir() / "models" / f"random-{name}-s{seed}"
    if (out / RANDOM_WEIGHTS_FILE).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".random-{name}-", dir=out.parent))
    try:
        config.update(bos_token_id=tk.BOS_ID, eos_token_id=[tk.EOS_ID, tk.IM_END_ID])
        tk.write_json(tmp / "config.json", config)
        tk.write_json(
            tmp / "generation_config.json",
            {"bos_token_id": tk.BOS_ID, "eos_token_id": [tk.EOS_ID, tk.IM_END_ID]},
        )
        tk.save_tokenizer(tk.train_tokenizer(), tmp)
        _pad_vocab(tmp / "tokenizer.json", int(config["vocab_size"]))
        tk.write_json(tmp / RANDOM_WEIGHTS_FILE, {"name": name, "seed": seed, "std": 0.02})
        make_readable(tmp)  # mkdtemp made it 0700; the cache may be shared
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / RANDOM_WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _pad_vocab(path: Path, vocab_size: int) -> None:
    data = json.loads(path.read_text("utf-8"))
    vocab = data["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"tokenizer has {len(vocab)} ids, more than vocab_size {vocab_size}")
    for i in range(len(vocab), vocab_size):
        vocab[f"<r{i}>"] = i
    path.write_text(json.dumps(data, ensure_ascii=False), "utf-8")


def random_weights(model_dir: str | Path) -> dict | None:
    """The marker's contents if ``model_dir`` holds a random-weights model, else None."""
    marker = Path(model_dir) / RANDOM_WEIGHTS_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None
