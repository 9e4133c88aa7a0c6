"""Deterministic training text for the bundled tiny tokenizer.

The corpus is generated, never downloaded: a fixed-seed ``random.Random`` strings together
English-like sentences, numbers, code-like lines and multi-byte UTF-8 text (accented Latin,
Cyrillic, Greek, CJK, emoji). The multi-byte part matters: it makes byte-level BPE learn some
merges inside multi-byte characters and leave others split, so token boundaries that cut a
character in half really occur and incremental detokenization gets exercised.

Contract: ``make_corpus()`` is a pure function of its arguments (same arguments, same list of
strings, on every platform and Python version >= 3.10) and runs in well under a second.
"""

from __future__ import annotations

import random

CORPUS_SEED = 20240611

_WORD_TEXT = (
    "the a an of to in on at by for with from into over under after before about between and "
    "or but so because while when where which who what how why if then than not no yes is "
    "are was were be been being has have had do does did will would can could should may "
    "might must shall time year people way day man woman child world life hand part place "
    "case week company system program question work government number night point home water "
    "room mother area money story fact month lot right study book eye job word business "
    "issue side kind head house service friend father power hour game line end member law "
    "car city community name president team minute idea kid body information back parent "
    "face others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education model server request token "
    "queue cache memory block batch prefill decode router worker scheduler priority latency "
    "budget kernel tensor layer attention head vector matrix engine stream socket message "
    "packet good new first last long great little own other old right big high different "
    "small large next early young important few public bad same able red blue green quick "
    "lazy bright dark happy quiet loud warm cold fast slow simple clear strange free full "
    "open run runs running ran make makes made go goes went going see saw seen know knew "
    "known take took taken think thought come came give gave find found tell told ask asked "
    "seem feel try leave call keep let begin help show hear play move live believe hold "
    "bring write wrote written provide sit stand lose pay meet include continue set learn "
    "lead understand watch follow stop create speak read allow add spend grow offer remember "
    "love consider appear buy wait serve die send expect build stay fall cut reach kill "
    "remain fox dog cat bird river mountain forest ocean garden window table chair paper "
    "letter music song picture color shape circle square triangle planet star moon sun cloud "
    "rain"
)
_WORDS = tuple(_WORD_TEXT.split())

_NAMES = ("Alice", "Bob", "Carol", "Dmitri", "Élodie", "Günter", "Hiroshi", "Inés", "Jürgen")

_MULTIBYTE = (
    # Accented Latin (2-byte UTF-8).
    "café naïve façade coöperate résumé jalapeño São Paulo Zürich Ærøskøbing crème brûlée "
    "Ångström Łódź Dvořák señor über straße déjà vu piñata Île-de-France",
    # Cyrillic and Greek (2-byte).
    "Привет мир как дела спасибо хорошо Москва Санкт-Петербург русский язык программа",
    "Καλημέρα κόσμε ευχαριστώ πολύ Αθήνα ελληνικά γλώσσα λόγος",
    # CJK (3-byte).
    "日本語のテキストです 東京 京都 大阪 こんにちは ありがとう 機械学習 言語モデル",
    "中文文本 你好世界 北京 上海 谢谢 模型 推理 服务器 令牌 缓存",
    "한국어 텍스트 안녕하세요 서울 감사합니다 모델",
    # Other scripts (2- and 3-byte).
    "עברית שלום مرحبا بالعالم हिन्दी नमस्ते ไทย สวัสดี",
    # Emoji and symbols (3- and 4-byte, including joiners and modifiers).
    "🙂 🚀 🎉 👍🏽 👩‍💻 🇯🇵 ❤️ ✨ ∑ ∫ √ ≤ ≥ ≠ → ← ⇒ € £ ¥ © ® ™ ° ± µ ½ ¾",
)

_CODE_TEMPLATES = (
    "def {w}_{v}(x, y={n}):\n    return x * {n} + y\n",
    "for i in range({n}):\n    total += values[i] ** 2\n",
    'if {w} is None:\n    raise ValueError("{w} must be set")\n',
    "{w}_{v} = [{n}, {m}, {n} + {m}]  # {w} {v}\n",
    "class {W}{V}:\n    def __init__(self):\n        self.{w} = {{}}\n",
    "const {w}{V} = ({v}) => {v}.map((x) => x + {n});\n",
    '{{"{w}": {n}, "{v}": [{m}, true, null], "ok": false}}\n',
    "SELECT {w}, COUNT(*) FROM {v} WHERE id > {n} GROUP BY {w};\n",
    '#include <stdio.h>\nint main(void) {{ printf("%d\\n", {n}); return 0; }}\n',
    "$ curl -s http://localhost:{n}/v1/{w} | jq '.{v}'\n",
)

_PUNCT_END = (".", ".", ".", "!", "?", "...", ";", ":")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), f"{rng.uniform(-1000, 1000):.3f}")
    if len(words) > 6 and rng.random() < 0.4:
        cut = rng.randrange(2, len(words) - 2)
        words[cut] += ","
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text = f'"{text}"'
    return text + rng.choice(_PUNCT_END)


def _code_line(rng: random.Random) -> str:
    w, v = rng.choice(_WORDS), rng.choice(_WORDS)
    return rng.choice(_CODE_TEMPLATES).format(
        w=w, v=v, W=w.capitalize(), V=v.capitalize(), n=rng.randint(0, 4096), m=rng.randint(0, 99)
    )


def _multibyte_line(rng: random.Random) -> str:
    words = rng.choice(_MULTIBYTE).split()
    picked = [rng.choice(words) for _ in range(rng.randint(3, 10))]
    if rng.random() < 0.5:
        picked.insert(rng.randrange(len(picked) + 1), rng.choice(_WORDS))
    return " ".join(picked) + rng.choice(("", ".", "。", "!", "?"))


def make_corpus(num_docs: int = 3000, seed: int = CORPUS_SEED) -> list[str]:
    """Return ``num_docs`` documents of mixed text; a pure function of the arguments.

    Roughly 60% prose, 20% code-like lines and 20% multi-byte lines, interleaved inside
    documents so that merges across kinds of text are learned too.
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(num_docs):
        parts: list[str] = []
        for _ in range(rng.randint(2, 6)):
            r = rng.random()
            if r < 0.6:
                parts.append(_sentence(rng))
            elif r < 0.8:
                parts.append(_code_line(rng))
            else:
                parts.append(_multibyte_line(rng))
        docs.append(rng.choice((" ", "\n", "\n\n")).join(parts))
    return docs
