"""HTTP auth middleware (router.auth) on a stand-in app: who may call what, the 401/403/429
bodies, per-key concurrency, and that no key leaks into messages, repr or the summary."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.app import openai_errors
from router.auth import Auth, AuthConfig, listens_on_loopback
from tandem import env

K1, K2, ADMIN, METRICS = "sk-one-111", "sk-two-222", "adm-333", "met-444"


def _app(config: AuthConfig, gate: asyncio.Event | None = None) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        if gate is not None and request.path == "/v1/completions":
            await gate.wait()
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[openai_errors, Auth(config).middleware])
    app.add_routes([web.post("/v1/completions", ok), web.post("/generate", ok),
                    web.get("/v1/models", ok), web.get("/health", ok), web.get("/health/live", ok),
                    web.get("/metrics", ok), web.get("/openapi.json", ok),
                    web.get("/admin/workers", ok), web.post("/admin/drain/{worker}", ok)])  # fmt: skip
    return app


def _run(config: AuthConfig, scenario, gate: asyncio.Event | None = None):
    async def main():
        async with TestClient(TestServer(_app(config, gate))) as client:
            return await scenario(client)

    return asyncio.run(main())


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _status(client, method: str, path: str, key: str | None = None, **kw):
    headers = _bearer(key) if key is not None else {}
    async with client.request(method, path, headers=headers, **kw) as r:
        return r.status, dict(r.headers), await r.json()


KEYED = AuthConfig(api_keys=(K1, K2), loopback_only=False)


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
@pytest.mark.parametrize("key", [None, "wrong", K1 + "x", K1[:-1], ""])
def test_missing_or_wrong_api_key_is_401_openai_json(path, key):
    async def scenario(client):
        return await _status(client, "POST", path, key, json={})

    status, headers, body = _run(KEYED, scenario)
    assert status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert K1 not in body["error"]["message"] and K2 not in body["error"]["message"]


def test_every_configured_key_is_accepted_and_the_scheme_is_case_insensitive():
    async def scenario(client):
        out = [await _status(client, "POST", "/v1/completions", k, json={}) for k in (K1, K2)]
        async with client.get("/v1/models", headers={"Authorization": f"bearer {K2}"}) as r:
            out.append((r.status, None, None))
        async with client.get("/v1/models", headers={"Authorization": f"Basic {K1}"}) as r:
            out.append((r.status, None, None))
        return [s for s, _, _ in out]

    assert _run(KEYED, scenario) == [200, 200, 200, 401]


def test_health_and_openapi_stay_open_and_unknown_paths_stay_behind_the_key():
    async def scenario(client):
        out = []
        for path in ("/health", "/health/live", "/openapi.json", "/metrics"):
            out.append((await _status(client, "GET", path))[0])
        out.append((await _status(client, "GET", "/v2/nothing"))[0])
        out.append((await _status(client, "GET", "/v2/nothing", K1))[0])
        return out

    assert _run(KEYED, scenario) == [200, 200, 200, 200, 401, 404]


def test_no_api_key_means_open_api():
    async def scenario(client):
        return (await _status(client, "POST", "/v1/completions", json={}))[0]

    assert _run(AuthConfig(), scenario) == 200


def test_metrics_key_guards_metrics_only():
    config = AuthConfig(metrics_key=METRICS)

    async def scenario(client):
        return [(await _status(client, "GET", "/metrics", k))[0] for k in (None, K1, METRICS)] + [
            (await _status(client, "GET", "/health"))[0]
        ]

    assert _run(config, scenario) == [401, 401, 200, 200]


def test_admin_without_admin_key_is_403_beyond_loopback_and_open_on_loopback():
    async def scenario(client):
        status, _, body = await _status(client, "GET", "/admin/workers", K1)
        drain = (await _status(client, "POST", "/admin/drain/w1", K1))[0]
        return status, body, drain

    status, body, drain = _run(KEYED, scenario)
    assert status == 403 and drain == 403
    assert "--admin-key" in body["error"]["message"]
    loopback = AuthConfig(api_keys=(K1,), loopback_only=True)
    assert _run(loopback, scenario)[0] == 200


def test_admin_key_is_required_and_api_keys_do_not_open_admin():
    config = AuthConfig(api_keys=(K1,), admin_key=ADMIN, loopback_only=True)

    async def scenario(client):
        return [(await _status(client, "GET", "/admin/workers", k))[0] for k in (None, K1, ADMIN)]

    assert _run(config, scenario) == [401, 401, 200]


def test_per_key_concurrency_limit_is_429_with_retry_after_and_frees_on_completion():
    config = AuthConfig(api_keys=(K1, K2), max_concurrent_per_key=1)

    async def scenario(client):
        first = asyncio.create_task(_status(client, "POST", "/v1/completions", K1, json={}))
        await asyncio.sleep(0.2)  # the first one holds K1's only slot at the gate
        second = await _status(client, "POST", "/v1/completions", K1, json={})
        # Another key has its own budget; health is not counted.
        other = asyncio.create_task(_status(client, "POST", "/v1/completions", K2, json={}))
        health = (await _status(client, "GET", "/health"))[0]
        gate.set()
        done = [(await first)[0], (await other)[0]]
        again = (await _status(client, "POST", "/v1/completions", K1, json={}))[0]
        return second, health, done, again

    gate = asyncio.Event()
    (status, headers, body), health, done, again = _run(config, scenario, gate)
    assert status == 429 and headers["Retry-After"] == "1"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "limit 1" in body["error"]["message"]
    assert health == 200 and done == [200, 200] and again == 200


@pytest.mark.parametrize("bad", ["", "has space", "a,b", "tab\there", "é-key", "x" * 1025])
def test_bad_keys_are_refused_without_echoing_them(bad):
    for kw in ({"api_keys": (bad,)}, {"admin_key": bad}, {"metrics_key": bad}):
        with pytest.raises(ValueError) as info:
            AuthConfig(**kw)
        assert (bad not in str(info.value)) or not bad


def test_per_key_limit_needs_api_keys_and_must_be_positive():
    with pytest.raises(ValueError, match="--api-key"):
        AuthConfig(max_concurrent_per_key=2)
    with pytest.raises(ValueError, match=">= 1"):
        AuthConfig(api_keys=(K1,), max_concurrent_per_key=0)


def test_repr_and_summary_never_show_a_key():
    config = AuthConfig(api_keys=(K1, K2), admin_key=ADMIN, metrics_key=METRICS)
    for text in (repr(config), str(config), config.describe()):
        assert not any(k in text for k in (K1, K2, ADMIN, METRICS)), text
    assert "2 API key(s)" in config.describe()
    assert "admin refused" in AuthConfig(loopback_only=False).describe()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False), ("10.1.2.3", False),
     ("no-such-host.invalid", False)],
)  # fmt: skip
def test_listens_on_loopback(host, loopback):
    assert listens_on_loopback(host) is loopback


def test_env_keys(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", " a1, ,b2 ,")
    monkeypatch.setenv("TANDEM_ADMIN_KEY", "")
    monkeypatch.setenv("TANDEM_METRICS_KEY", "m")
    assert env.api_keys() == ("a1", "b2")
    assert env.admin_key() is None and env.metrics_key() == "m"
    monkeypatch.delenv("TANDEM_API_KEY")
    assert env.api_keys() == ()
