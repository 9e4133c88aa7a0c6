"""Byte-level BPE tokenizer of the bundled tiny model, trained locally with ``tokenizers``.

Contract:
- Vocabulary of exactly ``VOCAB_SIZE`` (2048) ids. Ids 0..5 are the special tokens in
  ``SPECIAL_TOKENS`` order: ``<s>`` (bos) 0, ``</s>`` (eos) 1, ``<unk>`` 2, ``<pad>`` 3,
  ``<|im_start|>`` 4, ``<|im_end|>`` 5; then the 256 byte symbols, then the learned merges.
- ByteLevel pre-tokenizer (no prefix space) and ByteLevel decoder, so every Unicode string
  round-trips: ``decode(encode(s, add_special_tokens=False)) == s``. Tokens may end in the
  middle of a multi-byte character; incremental detokenizers must cope.
- BOS policy, like Llama: the post-processor prepends ``<s>`` when a caller asks for special
  tokens (``tokenizer(text)``, ``encode(text)``), and never appends ``</s>``. The chat template
  writes ``{{ bos_token }}`` itself, and ``apply_chat_template`` tokenizes with
  ``add_special_tokens=False``, so a chat prompt starts with exactly one ``<s>``. Anything
  that tokenizes a rendered chat prompt must likewise pass ``add_special_tokens=False``.
- Training is deterministic (same corpus, same ``tokenizer.json`` bytes) and takes a fraction
  of a second.

The files are written by hand rather than with ``PreTrainedTokenizerFast.save_pretrained``:
transformers 5 would write a 5-only ``tokenizer_class`` and move the chat template into a
separate file; the hand-written ``tokenizer_config.json`` loads in transformers 4 and 5 alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tandem.tinymodel.corpus import make_corpus

VOCAB_SIZE = 2048
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN, IM_START, IM_END)
BOS_ID, EOS_ID, UNK_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
MODEL_MAX_LENGTH = 4096

# ChatML with a leading BOS. The generation prompt opens an assistant turn; the model's turn
# ends with <|im_end|>, which generation_config lists as a stop id next to </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE on the generated corpus; deterministic.

    Raises RuntimeError if the corpus were ever too small to fill ``VOCAB_SIZE`` ids, since
    every model config assumes ``vocab_size == len(tokenizer) == VOCAB_SIZE``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} ids, want {VOCAB_SIZE}")
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents (chat template included)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in enumerate(SPECIAL_TOKENS)},
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, Any]:
    """The ``special_tokens_map.json`` contents, for readers that still look there."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as stable, sorted, UTF-8 JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "special_tokens_map.json", special_tokens_map())
