"""A ``PromptTokenizer`` backed by the server's ``POST /tokenize`` and ``/detokenize``.

For ``tandem loadgen`` when no ``--tokenizer`` is given and no local tokenizer is at hand
(e.g. a ``random:NAME`` model on a GPU box): token counts and exact-length prompts come from
the server under test, so they agree with what it serves.

Contract: the same as ``PromptTokenizer`` (``text_of_length`` re-encodes to the returned
length), with one difference: prompts are built only from whole-word tokens found by
tokenizing a fixed English word list once (``usable_ids`` are those tokens; lengths are
then fixed up by re-encoding, as ``PromptTokenizer.text_of_ids`` does). Every
``encode`` and ``decode`` is one HTTP call, cached by argument, so a run adds a few calls
per request to the server (counting an output's tokens, when the server reports no usage).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from loadgen.tokens import PromptTokenizer, TokenizerError

# Common English words: under any sizeable BPE vocabulary most are one token with a leading
# space, which is what exact-length prompts are made of.
_WORDS = """the of and to in is was for on are with as his they be at one have this from or
had by word but what some we can out other were all there when up use your how said an each
she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my
over know water than call first who may down side been now find any new work part take get
place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small
end put home read hand port large spell add even land here must big high such follow act why
ask men change went light kind off need house picture try us again animal point mother world
near build self earth father head stand own page should country found answer school grow study
still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch
color face wood main enough plain girl usual young ready above ever red list though feel talk
bird soon body dog family direct pose leave song measure door product black short numeral
class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel less morning
""".split()  # noqa: SIM905


class RemoteTokenizer(PromptTokenizer):
    def __init__(self, url: str, model: str | None = None, timeout: float = 30.0) -> None:
        self._url = url.rstrip("/")
        self._model = model
        self._timeout = timeout
        self._encoded: dict[str, list[int]] = {}
        self._decoded: dict[tuple[int, ...], str] = {}
        probe = self._post("/tokenize", {"prompt": " " + " ".join(_WORDS),
                                         "add_special_tokens": False,
                                         "return_token_strs": True})  # fmt: skip
        words = sorted({t for t, s in zip(probe["tokens"], probe["token_strs"], strict=True)
                        if len(s) > 1 and s[0] == " " and s[1:].isalpha()})  # fmt: skip
        if len(words) < 64:
            raise TokenizerError(
                f"{self._url}/tokenize: only {len(words)} whole-word tokens found (need 64); "
                "give --tokenizer DIR"
            )
        self.usable_ids = np.array(words, dtype=np.int64)
        self._word_ids = self.usable_ids

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._model is not None:
            body = {**body, "model": self._model}
        req = urllib.request.Request(
            self._url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise TokenizerError(f"{self._url}{path}: HTTP {e.code}: {e.read()[:200]!r}") from None
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{self._url}{path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            out = self._post("/tokenize", {"prompt": text, "add_special_tokens": False})
            self._encoded[text] = list(out["tokens"])
        return self._encoded[text]

    def decode(self, ids: list[int]) -> str:
        key = tuple(ids)
        if key not in self._decoded:
            self._decoded[key] = self._post("/detokenize", {"tokens": list(ids)})["prompt"]
        return self._decoded[key]

    def _words(self) -> np.ndarray:
        return self._word_ids
