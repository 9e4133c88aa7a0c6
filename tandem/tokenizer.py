"""A pure tokenizer for the router: Hugging Face ``tokenizer.json`` + jinja2 chat templates.

transformers' ``AutoTokenizer`` imports torch (seconds, and a GPU stack the router must
never touch), so the router reads the same files with the ``tokenizers`` library and
renders chat templates with jinja2 the way transformers does (sandboxed, trim_blocks,
lstrip_blocks, ``raise_exception``). Token ids are identical to ``AutoTokenizer``'s for
the same folder (tests/engine/test_tokenizer.py checks it).

It exposes the small surface the rest of Tandem uses — ``encode``, ``decode``,
``apply_chat_template``, ``backend_tokenizer``, ``added_tokens_decoder``,
``all_special_ids``, ``eos_token_id`` — so ``IncrementalDetokenizer`` accepts it as is.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import Tokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class FastTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
        self.backend_tokenizer = Tokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.added_tokens_decoder = {
            int(k): SimpleNamespace(content=v.get("content"), special=bool(v.get("special", False)))
            for k, v in (cfg.get("added_tokens_decoder") or {}).items()
        }
        if not self.added_tokens_decoder:  # older folders: take tokenizer.json's own list
            self.added_tokens_decoder = {
                i: SimpleNamespace(content=t.content, special=t.special)
                for i, t in self.backend_tokenizer.get_added_tokens_decoder().items()
            }
        template = cfg.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = (
            self.backend_tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        )
        self.eos_token_id = (
            self.backend_tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        )
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i, t in self.added_tokens_decoder.items() if t.special]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        # Some folders ask for BOS in tokenizer_config.json without a post-processor that adds it.
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and ``tools``, as transformers passes them) to the prompt
        text (tokenize it with add_special_tokens=False)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            # As transformers renders it: no HTML escaping, non-ASCII kept.
            env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: (
                json.dumps(
                    x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
                )
            )
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
