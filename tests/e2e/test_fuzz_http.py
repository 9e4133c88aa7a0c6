"""Fuzzing a live `tandem serve` over HTTP (issue #18): no 5xx, no hang, no crash.

Bodies come from the router's own OpenAPI schemas (``/openapi.json``, fetched from the
server under test) through a small schema-to-hypothesis converter, and from hostile
variants of them: wrong types in every field, integers far past 64 bits, NaN and
Infinity, deep nesting, invalid UTF-8, lone surrogates, truncated JSON, non-object
bodies, and bad or missing keys. Every case must get an answer below 500 within
``CASE_TIMEOUT_S`` (a 200 stream must run to its end), and the server must stay healthy.

Bounded for CI: ``SCHEMA_CASES + HOSTILE_CASES`` cases (``TANDEM_FUZZ_CASES`` scales
them), each at most ``--max-tokens-limit 8`` generated tokens over at most 64 prompt
tokens on the tiny model. The number of cases run is printed and recorded as the
``fuzz_schema_cases`` / ``fuzz_hostile_cases`` properties of the JUnit report.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.servers import serve

KEY = "sk-fuzz-0123456789"
SCALE = float(os.environ.get("TANDEM_FUZZ_CASES", "1"))
SCHEMA_CASES = max(1, int(150 * SCALE))
HOSTILE_CASES = max(1, int(150 * SCALE))
CASE_TIMEOUT_S = 60.0
ENDPOINTS = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/generate": "GenerateRequest",
}
RUN: dict[str, int] = {"cases": 0, "2xx": 0, "4xx": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serve(tiny_llama_dir, "--api-key", KEY, "--max-tokens-limit", "8",
               "--max-prompt-tokens", "64", "--max-body-mb", "1", "--request-timeout", "30",
               "--served-model-name", "tiny", timeout=120) as url:  # fmt: skip
        with urllib.request.urlopen(url + "/openapi.json", timeout=10) as r:
            doc = json.loads(r.read())
        yield url, doc
    print(f"\nfuzz: {RUN['cases']} cases run ({RUN['2xx']} 2xx, {RUN['4xx']} 4xx, 0 5xx)")


# ---------------------------------------------------------------- schema -> strategy
_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(
    '\n\t <>{}\\"é日🙂'
)
_TEXT = st.text(_CHARS, max_size=24)
_JSON_SCALAR = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | _TEXT
)  # fmt: skip
_ANY_JSON = st.recursive(
    _JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """Values of ``schema`` (the subset ``router.openapi`` uses), kept small: arrays of at
    most 6 items, strings of at most 24 characters."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "oneOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["oneOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, components) for k in kind])
    if kind == "object":
        props = {k: from_schema(v, components) for k, v in schema.get("properties", {}).items()}
        required = {k: props.pop(k) for k in schema.get("required", [])}
        return st.fixed_dictionaries(required, optional=props)
    if kind == "array":
        lo = schema.get("minItems", 0)
        hi = min(schema.get("maxItems", lo + 6), lo + 6)
        return st.lists(from_schema(schema.get("items", {}), components), min_size=lo, max_size=hi)
    if kind == "string":
        lo = schema.get("minLength", 0)
        return st.text(_CHARS, min_size=lo, max_size=max(lo, 24))
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        # Mostly small values: a prompt's ids must be inside the vocabulary to get anywhere.
        small_lo = -5 if lo is None else max(lo, -5)
        small_hi = 300 if hi is None else min(hi, 300)
        full = st.integers(lo, hi)
        small = st.integers(small_lo, small_hi)
        return st.one_of(small, small, small, full) if small_lo <= small_hi else full
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum")
        return st.floats(
            lo, hi, allow_nan=False, allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema,
        )  # fmt: skip
    if kind == "boolean":
        return st.booleans()
    return _ANY_JSON


# ---------------------------------------------------------------- hostile variants
def _deep(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _dumps(body) -> bytes:
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def hostile(draw, doc: dict) -> tuple[str, bytes, str | None]:
    """(path, raw body, key): a schema body bent one way."""
    components = doc["components"]["schemas"]
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body = draw(from_schema(components[ENDPOINTS[path]], components))
    fields = sorted(components[ENDPOINTS[path]]["properties"])
    how = draw(st.sampled_from([
        "wrong_type", "huge_int", "nan", "deep_field", "deep_body", "bad_utf8", "surrogate",
        "truncated", "not_object", "bad_key", "nested_sampling", "long_text", "empty",
    ]))  # fmt: skip
    key = KEY
    if how == "wrong_type":
        body[draw(st.sampled_from(fields))] = draw(_ANY_JSON)
        raw = _dumps(body)
    elif how == "huge_int":
        big = draw(st.integers(2**63, 2**300) | st.integers(-(2**300), -(2**63) - 1))
        body[draw(st.sampled_from(fields))] = draw(st.sampled_from([big, [big], {"x": big}]))
        raw = _dumps(body)
    elif how == "nan":
        body[draw(st.sampled_from(fields))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        raw = _dumps(body)
    elif how == "deep_field":
        depth = draw(st.integers(100, 200_000))
        raw = _dumps(body)[:-1] + b', "' + draw(st.sampled_from(fields)).encode() + b'": '
        raw += _deep(depth, draw(st.sampled_from(["list", "dict"]))) + b"}"
    elif how == "deep_body":
        raw = _deep(draw(st.integers(1000, 400_000)), draw(st.sampled_from(["list", "dict"])))
    elif how == "bad_utf8":
        raw = _dumps(body)
        at = draw(st.integers(0, len(raw)))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]))
            + raw[at:]
        )
    elif how == "surrogate":
        body[draw(st.sampled_from(fields))] = draw(
            st.sampled_from(["\ud800", "a\udfffb", ["\udbff"]])
        )
        raw = _dumps(body)
    elif how == "truncated":
        raw = _dumps(body)
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "not_object":
        raw = _dumps(draw(_ANY_JSON.filter(lambda v: not isinstance(v, dict))))
    elif how == "bad_key":
        key = draw(st.sampled_from([None, "", KEY + "x", KEY[:-1], "Bearer", "é" * 8]))
        raw = _dumps(body)
    elif how == "nested_sampling":
        raw = _dumps({"prompt_token_ids": [1, 2], "sampling_params": draw(_ANY_JSON)})
    elif how == "long_text":
        text = draw(st.sampled_from(["a ", "日本", "🙂", "x"])) * draw(st.integers(1000, 200_000))
        body["prompt" if path == "/v1/completions" else "messages"] = (
            text if path == "/v1/completions" else [{"role": "user", "content": text}]
        )
        raw = _dumps(body)
    else:
        raw = b""
    return path, raw, key


# ---------------------------------------------------------------- the check
def _send(url: str, path: str, raw: bytes, key: str | None) -> int:
    """POST ``raw``; the status once the whole answer is in (no 5xx, no hang)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=CASE_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}".encode().decode("latin-1")
    try:
        conn.request("POST", path, raw, headers)
        r = conn.getresponse()
        data = r.read()  # a stream runs to its end, within the timeout
    finally:
        conn.close()
    RUN["cases"] += 1
    assert r.status < 500, (path, raw[:300], r.status, data[:500])
    if r.status >= 400:
        RUN["4xx"] += 1
        error = json.loads(data)["error"]  # every refusal is OpenAI's error JSON
        assert set(error) == {"message", "type", "param", "code"}, error
    else:
        RUN["2xx"] += 1
        if r.getheader("Content-Type", "").startswith("text/event-stream"):
            assert data.rstrip().endswith(b"data: [DONE]"), data[-300:]
            assert b'"error"' not in data or b"server_error" not in data, data[-500:]
    return r.status


_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def test_schema_generated_bodies(server, record_testsuite_property):
    url, doc = server
    components = doc["components"]["schemas"]
    cases = st.sampled_from(sorted(ENDPOINTS)).flatmap(
        lambda p: st.tuples(st.just(p), from_schema(components[ENDPOINTS[p]], components))
    )
    before = RUN["cases"]

    @settings(max_examples=SCHEMA_CASES, **_SETTINGS)
    @given(cases)
    def check(case):
        path, body = case
        _send(url, path, _dumps(body), KEY)

    check()
    record_testsuite_property("fuzz_schema_cases", RUN["cases"] - before)
    print(f"\nfuzz schema: {RUN['cases'] - before} cases")


def test_hostile_bodies(server, record_testsuite_property):
    url, doc = server
    before = RUN["cases"]

    @settings(max_examples=HOSTILE_CASES, **_SETTINGS)
    @given(hostile(doc))
    def check(case):
        path, raw, key = case
        status = _send(url, path, raw, key)
        if key != KEY:
            assert status == 401

    check()
    record_testsuite_property("fuzz_hostile_cases", RUN["cases"] - before)
    print(f"\nfuzz hostile: {RUN['cases'] - before} cases")


def test_server_is_healthy_after_fuzzing(server):
    url, _ = server
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200
    status = _send(url, "/v1/completions", _dumps({"prompt": "hi", "max_tokens": 2}), KEY)
    assert status == 200
