"""Load Hugging Face safetensors into Tandem's fused modules.

Name mapping (HF → Tandem), per layer i:
  self_attn.{q,k,v}_proj.{weight,bias} → self_attn.qkv_proj.{weight,bias}  (rows q, k, v)
  mlp.{gate,up}_proj.weight            → mlp.gate_up_proj.weight          (rows gate, up)
Everything else keeps its name minus the leading ``model.``. ``lm_head.weight`` is
absent with tied embeddings. A missing or unexpected tensor is an error naming it.

A folder made by ``tandem.random_model`` (``--model random:NAME``) has no weights: they are
drawn on the device, seeded, ``N(0, std)`` for matrices and ones for norms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.config import ModelConfig
from tandem.models.layers import rope_inv_freq
from tandem.models.llama import LlamaForCausalLM
from tandem.random_model import random_weights

_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights found in {model_dir}")
    return files


def load_model(
    model_dir: str | Path, cfg: ModelConfig, device: str, dtype: torch.dtype
) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    spec = random_weights(model_dir)
    if spec is not None:
        return _random_init(model, cfg, device, dtype, int(spec["seed"]), float(spec["std"]))
    params = dict(model.named_parameters(remove_duplicate=False))
    pieces: dict[str, list[torch.Tensor | None]] = {}
    loaded: dict[str, torch.Tensor] = {}
    for path in _safetensor_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if "rotary_emb.inv_freq" in hf_name:
                    continue
                name = hf_name.removeprefix("model.")
                tensor = f.get_tensor(hf_name)
                fused = _fuse_target(name)
                if fused is not None:
                    target, index = fused
                    pieces.setdefault(target, [None, None, None])[index] = tensor
                    continue
                if name not in params:
                    raise ValueError(f"unexpected tensor {hf_name!r} in {path.name}")
                loaded[name] = tensor
    for target, parts in pieces.items():
        present = [p for p in parts if p is not None]
        expected = 2 if "gate_up" in target else 3
        if len(present) != expected:
            raise ValueError(
                f"incomplete fused weight {target!r}: got {len(present)} of {expected} parts"
            )
        loaded[target] = torch.cat(present, dim=0)
    if cfg.tie_word_embeddings:
        loaded.pop("lm_head.weight", None)
    missing = [
        n
        for n in params
        if n not in loaded and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if missing:
        raise ValueError(
            f"weights missing from {model_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in loaded.items():
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {name}: model {tuple(param.shape)}, file {tuple(tensor.shape)}"
                )
            model.get_parameter(name).copy_(tensor.to(dtype))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        # Buffers (inv_freq) were created on meta; recompute them on the real device.
        model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope).to(device)
    model = model.to(dtype=dtype)
    model.rotary.inv_freq = model.rotary.inv_freq.float()  # keep rope math in float32
    return model.eval()


def _fuse_target(name: str) -> tuple[str, int] | None:
    # name like "layers.3.self_attn.q_proj.weight"
    for src, (dst, index) in _FUSED.items():
        marker = f".{src}."
        if marker in name:
            return name.replace(marker, f".{dst}."), index
    return None


def _random_init(
    model: LlamaForCausalLM,
    cfg: ModelConfig,
    device: str,
    dtype: torch.dtype,
    seed: int,
    std: float,
) -> LlamaForCausalLM:
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope).to(device)
    return model.eval()
