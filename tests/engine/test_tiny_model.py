"""The generated tiny models: loadable offline, deterministic, right shapes, peaked greedy logits."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tandem.tinymodel import ARCHS, default_model_dir, make_tiny_model
from tandem.tinymodel import build as tiny_build
from tandem.tinymodel import tokenizer as tk
from tandem.tinymodel.measure import greedy_gap_stats, sample_prompts

CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The model is tiny: extra intra-op threads only add barrier waits, which cost up to 100x
    # on a machine busy with other work (observed: 41 s instead of 0.5 s for one measurement).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _raw_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text("utf-8"))


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_offline_with_transformers(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[arch]
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert type(model).__name__ == CLASSES[arch]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == model.config.vocab_size == tk.VOCAB_SIZE
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], tk.VOCAB_SIZE)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_bytes(arch: str, tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = make_tiny_model(tmp_path / arch, arch, seed=0)
    assert torch.equal(torch.rand(3), expected), "building must not disturb the global RNG"
    for name in ("model.safetensors", "config.json", "generation_config.json", *TOKENIZER_FILES):
        assert (again / name).read_bytes() == (tiny_model_dirs[arch] / name).read_bytes(), name


def test_different_seed_different_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "s1", "llama", seed=1)
    a, b = load_file(tiny_llama_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert not torch.equal(a[name], b[name]), name
    for name in TOKENIZER_FILES:  # the tokenizer never depends on the seed
        assert (other / name).read_bytes() == (tiny_llama_dir / name).read_bytes()


def test_invalid_arch_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        make_tiny_model(tmp_path / "x", "gpt2")
    for arch in ARCHS:
        assert arch in str(err.value)
    assert not (tmp_path / "x").exists()


def test_special_tokens_and_generation_config(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok.convert_tokens_to_ids(list(tk.SPECIAL_TOKENS)) == list(range(6))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 3)
    assert tok.unk_token_id == 2
    assert tok("abc").input_ids[0] == tk.BOS_ID  # BOS added, like Llama
    assert tk.EOS_ID not in tok("abc").input_ids
    assert tk.BOS_ID not in tok("abc", add_special_tokens=False).input_ids
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text("utf-8"))
    assert gen["do_sample"] is False
    assert gen["bos_token_id"] == tk.BOS_ID
    assert gen["eos_token_id"] == [tk.EOS_ID, tk.IM_END_ID]


def test_chat_template(tiny_llama_dir: Path) -> None:
    cfg = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text("utf-8"))
    assert "<|im_start|>" in cfg["chat_template"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert ids[:2] == [tk.BOS_ID, tk.IM_START_ID] and ids.count(tk.BOS_ID) == 1
    assert ids.count(tk.IM_END_ID) == 1


ROUND_TRIP = [
    "café naïve Zürich",
    "日本語のテキスト 東京",
    "Привет, мир!",
    "emoji 🙂🚀 👩‍💻 🇯🇵 and ZWJ",
    'mixed: x=1; y = "ünïcödé"\n\tτέλος 完 🎉',
    "never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓂀",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_unicode_round_trip(text: str, tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tk.UNK_ID not in ids


def test_some_tokens_split_multibyte_characters(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok("日本語 Привет 🙂 café 👩‍💻 中文文本", add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "expected tokens that end inside a character"


@pytest.mark.parametrize("arch", ARCHS)
def test_config_fields(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[arch]
    raw = _raw_config(model_dir)
    for key, value in {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 352,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }.items():
        assert raw[key] == value, key
    assert raw["architectures"] == [CLASSES[arch]]
    theta = {"llama": 500000.0, "mistral": 10000.0, "qwen2": 1e6, "qwen3": 1e6}[arch]
    assert raw["rope_theta"] == theta
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.rope_parameters["rope_theta"] == theta
    weights = load_file(model_dir / "model.safetensors")
    tied = arch in ("qwen2", "qwen3")
    assert raw["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in weights) is not tied
    if arch == "llama":
        scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0}
        scaling |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
        assert raw["rope_scaling"] == scaling
        assert {k: cfg.rope_parameters[k] for k in scaling} == scaling
    if arch == "mistral":
        assert raw["sliding_window"] == cfg.sliding_window == 128
    if arch == "qwen2":
        assert raw["use_sliding_window"] is False
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = weights[f"model.layers.0.self_attn.{proj}.bias"]
            assert (bias != 0).all() and bias.abs().mean() > 0.1, proj
    if arch == "qwen3":
        assert raw["head_dim"] == 48 and raw["attention_bias"] is False
        assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 48, 128)
        assert weights["model.layers.0.self_attn.q_norm.weight"].shape == (48,)
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm))


def test_mistral_sliding_window_changes_long_prompts(tiny_model_dirs: dict[str, Path]) -> None:
    model = _load(tiny_model_dirs["mistral"])
    ids = torch.randint(6, tk.VOCAB_SIZE, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(ids).logits[0, -1]
        model.config.sliding_window = None
        full = model(ids).logits[0, -1]
    assert (windowed - full).abs().max() > 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_depend_on_whole_context_and_positions(
    arch: str, tiny_model_dirs: dict[str, Path]
) -> None:
    model = _load(tiny_model_dirs[arch])
    ids = torch.randint(6, tk.VOCAB_SIZE, (1, 200), generator=torch.Generator().manual_seed(1))
    changed_first = ids.clone()
    changed_first[0, 0] = 7 if ids[0, 0] != 7 else 8
    positions = torch.arange(200)[None]
    gapped = positions + (positions >= 100) * 50  # tokens 100.. sit 50 positions further away
    with torch.no_grad():
        base = model(ids).logits[0, -1]
        far = model(changed_first).logits[0, -1]
        moved = model(ids, position_ids=gapped).logits[0, -1]
        shifted = model(ids, position_ids=positions + 37).logits[0, -1]
    # Well above float32 noise (~1e-4 here): the first token and relative positions matter,
    # and only relative positions do (RoPE).
    assert (base - far).abs().max() > 0.1
    assert (base - moved).abs().max() > 0.1
    assert (base - shifted).abs().max() < 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_is_peaked_and_varied(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    # A smaller version of `python -m tandem.tinymodel.measure` (16 prompts x 64 tokens).
    prompts = sample_prompts(num=8, max_len=300)
    stats = greedy_gap_stats(tiny_model_dirs[arch], prompts, new_tokens=24)
    assert stats.steps == 8 * 24
    assert stats.min_gap > 1e-4
    assert stats.min_gap_over_err > 10
    assert stats.p1_gap > 1e-2
    assert stats.distinct_continuations == len(prompts)
    assert stats.distinct_tokens > 60
    assert stats.min_distinct_per_prompt >= 6


def test_default_model_dir_builds_once_says_so_and_is_readable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_llama_dir: Path,
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    old_umask = os.umask(0o077)  # a private umask: the cache must still be readable by others
    try:
        first = default_model_dir()
    finally:
        os.umask(old_umask)
    assert first == tmp_path / "models" / "tiny-llama-s0"
    for name in ("model.safetensors", *TOKENIZER_FILES):
        assert (first / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    err = capsys.readouterr().err
    assert "building the bundled tiny model into " in err, err  # ~/... under $HOME
    assert "models/tiny-llama-s0 ... (first run only)" in err, err
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in first.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "model.safetensors" in modes  # was 0600

    def must_not_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("default_model_dir rebuilt an existing model")

    monkeypatch.setattr(tiny_build, "make_tiny_model", must_not_build)
    assert default_model_dir() == first
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama-s0"]
    assert capsys.readouterr().err == ""  # first run only


def test_make_tiny_model_files_are_readable_under_the_usual_umask(tiny_llama_dir: Path) -> None:
    """The session's model was written under the test run's umask (022 here): every file is
    0644, the safetensors file included (safetensors itself writes 0600)."""
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_llama_dir.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644), modes


def test_default_model_dir_survives_a_lost_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / "tiny-llama-s0"
    real = tiny_build.make_tiny_model

    def build_while_another_process_wins(out_dir: Path, arch: str, seed: int) -> Path:
        real(target, arch, seed)  # the other process renames its copy into place first
        return real(out_dir, arch, seed)

    monkeypatch.setattr(tiny_build, "make_tiny_model", build_while_another_process_wins)
    assert default_model_dir() == target
    assert (target / "config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama-s0"]
