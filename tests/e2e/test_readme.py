"""Every README snippet runs as written (``tests/e2e/readme_snippets.py`` says how, and what
it changes: free ports instead of 8000/6379, the test's folder instead of /tmp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import readme_snippets as rs
from tests.e2e.servers import free_port, serve

SNIPPETS = rs.extract(rs.README.read_text("utf-8"))


@pytest.fixture(scope="module")
def readme_cache(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A TANDEM_CACHE_DIR whose bundled model is the session's tiny Llama (the same model:
    llama, seed 0), so no snippet builds it again or writes to ~/.cache."""
    from tandem.tinymodel import default_model_path

    cache = tmp_path_factory.mktemp("readme_cache")
    (cache / "models").mkdir()
    (cache / "models" / default_model_path().name).symlink_to(tiny_llama_dir)
    return cache


@pytest.fixture(scope="module")
def readme_server(readme_cache: Path):
    """`tandem serve` as the README starts it (no flags but the port), for the curl snippets."""
    with serve(None, env={"TANDEM_CACHE_DIR": str(readme_cache)}) as url:
        yield url, int(url.rpartition(":")[2])


def _params():
    for s in SNIPPETS:
        marks = [pytest.mark.skip(reason=s.reason)] if s.mode == "not-run" else []
        yield pytest.param(s, id=s.id, marks=marks)


@pytest.mark.parametrize("snippet", list(_params()))
def test_readme_snippet_runs(snippet: rs.Snippet, request, tmp_path: Path, readme_cache: Path):
    env = rs.environment(tmp_path, readme_cache)
    if snippet.mode == "service":
        port = free_port()
        body = rs.substitute(snippet.body, {rs.SERVER_PORT: port, rs.REDIS_PORT: free_port()},
                             tmp_path)  # fmt: skip
        answer = rs.run_service(snippet, body, env, tmp_path, f"http://127.0.0.1:{port}", 300)
        assert answer["choices"][0]["finish_reason"] in ("length", "stop"), answer
        return
    ports = {rs.REDIS_PORT: free_port()}
    if snippet.uses_server:
        _, ports[rs.SERVER_PORT] = request.getfixturevalue("readme_server")
    rs.run(snippet, rs.substitute(snippet.body, ports, tmp_path), env, tmp_path, timeout=300)


def test_the_readme_has_snippets_of_every_kind():
    modes = {s.mode for s in SNIPPETS}
    assert modes == {"run", "service", "not-run"}, modes
    assert any(s.uses_server for s in SNIPPETS)  # the curl examples
    assert any(s.lang == "python" and s.mode == "run" for s in SNIPPETS)  # the offline API
    for s in SNIPPETS:
        if s.mode == "not-run":
            assert len(s.reason) > 8, f"README line {s.line}: a not-run snippet must say why"


def test_a_broken_snippet_fails_the_test(tmp_path: Path, readme_cache: Path):
    """The runner is strict: a failing command, an HTTP error, a Python exception all fail."""
    env = rs.environment(tmp_path, readme_cache)
    closed = free_port()  # nothing listens there
    broken = [
        ("bash", "echo fine\nfalse\necho not reached\n"),
        ("bash", f"curl -s localhost:{closed}/v1/models\n"),
        ("python", "from tandem import SamplingParams\nSamplingParams(max_tokens=-1)\n"),
    ]
    for lang, body in broken:
        snippet = rs.Snippet(1, lang, body, "run")
        with pytest.raises(AssertionError, match="exited"):
            rs.run(snippet, body, env, tmp_path, timeout=60)
    text = "intro\n\n<!-- run: nonsense -->\n```bash\necho\n```\n"
    with pytest.raises(ValueError, match="unknown marker"):
        rs.extract(text)


def test_an_http_error_fails_a_curl_snippet(tmp_path: Path, readme_cache: Path, readme_server):
    """``curl -s`` alone exits 0 on a 404; the snippets' curl does not."""
    _, port = readme_server
    env = rs.environment(tmp_path, readme_cache)
    body = f"curl -s localhost:{port}/v1/no-such-endpoint\n"
    with pytest.raises(AssertionError, match="exited 22"):
        rs.run(rs.Snippet(1, "bash", body, "run"), body, env, tmp_path, timeout=60)
