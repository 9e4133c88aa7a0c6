"""The container entrypoint's argv (TANDEM_* settings -> flags) and the healthcheck's probes."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from tandem import container
from tandem.cli import build_parser


def test_settings_become_flags_before_the_command_line_so_flags_win():
    settings = {"TANDEM_MODEL": "/models/m", "TANDEM_PORT": "9000", "TANDEM_DEVICE": "cuda"}
    argv = container.service_argv("router", ["--port", "8001"], settings)
    assert argv[:5] == ["router", "--model", "/models/m", "--port", "9000"]
    assert "--device" not in argv  # the router takes no --device
    args = build_parser().parse_args(argv)
    assert (args.model, args.port) == ("/models/m", 8001)


def test_tandem_args_is_split_like_a_shell_and_empty_settings_are_ignored():
    settings = {"TANDEM_ARGS": "--kv-blocks 64 --served-model-name 'my model'", "TANDEM_HOST": ""}
    argv = container.service_argv("router", [], settings)
    assert argv == ["router", "--kv-blocks", "64", "--served-model-name", "my model"]


@pytest.mark.parametrize("role", ["prefill-worker", "decode-worker"])
def test_workers_get_a_unique_id_unless_one_is_given(role):
    a = container.service_argv(role, [], {})
    b = container.service_argv(role, [], {})
    id_a = build_parser().parse_args(a).worker_id
    assert id_a.startswith(role.removesuffix("-worker") + "-")
    assert id_a != build_parser().parse_args(b).worker_id
    assert container.service_argv(role, ["--worker-id=w1"], {}) == [role, "--worker-id=w1"]
    given = container.service_argv(role, [], {"TANDEM_WORKER_ID": "w2"})
    assert given == [role, "--worker-id", "w2"]


def test_worker_settings_parse_with_the_real_cli():
    settings = {
        "TANDEM_MODEL": "/m",
        "TANDEM_REGISTRY": "redis://127.0.0.1:6379",
        "TANDEM_DEVICE": "cuda",
        "TANDEM_DTYPE": "bfloat16",
        "TANDEM_ADVERTISE_HOST": "10.0.0.5",
    }
    args = build_parser().parse_args(container.service_argv("decode-worker", [], settings))
    assert (args.registry, args.device, args.dtype) == (
        "redis://127.0.0.1:6379",
        "cuda",
        "bfloat16",
    )
    assert (args.advertise_host, args.port, args.kv_port) == ("10.0.0.5", 0, 0)


def test_other_commands_pass_through_untouched():
    settings = {"TANDEM_MODEL": "/m", "TANDEM_ARGS": "--x"}
    assert container.service_argv("make-tiny-model", ["/out"], settings) == [
        "make-tiny-model",
        "/out",
    ]
    assert container.check(["loadgen", "--url", "x"]) == (True, "not a service: nothing to probe")


def _serve_health(status: int, body: dict):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            data = json.dumps(body).encode()
            self.send_response(status if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("status", "workers", "min_workers", "healthy"),
    [(200, 4, 1, True), (200, 1, 2, False), (503, 0, 1, False)],
)
def test_router_health(status, workers, min_workers, healthy):
    server = _serve_health(status, {"status": "x", "workers": workers})
    try:
        port = server.server_address[1]
        ok, reason = container.check(
            ["router", "--host", "0.0.0.0", "--registry", "redis://r", "--port", str(port)],
            min_workers=min_workers,
        )
    finally:
        server.shutdown()
    assert ok is healthy, reason


def test_router_that_does_not_answer_is_unhealthy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        ok, reason = container.check(["router", "--worker", "h:1", "--port", str(port)])
    assert not ok and "/health" in reason


def test_worker_without_registry_probes_its_fixed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert container.check(["decode-worker", "--port", str(port)])[0]
    assert not container.check(["decode-worker", "--port", str(port)])[0]
    assert container.check(["decode-worker"])[0]  # port 0, no registry: nothing to probe


def test_worker_with_unreachable_registry_is_unhealthy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        ok, reason = container.check(
            ["prefill-worker", "--registry", f"redis://127.0.0.1:{port}", "--worker-id", "p1"],
            timeout=1.0,
        )
    assert not ok and "registry" in reason


def test_run_saves_the_argv_for_health_then_execs_the_cli(tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    monkeypatch.setenv("TANDEM_STATE_FILE", str(state))
    monkeypatch.setenv("TANDEM_MODEL", "/m")
    execs = []

    def fake_execv(path, argv):
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(container.os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        container.main(["run", "router", "--registry", "redis://r"])
    saved = json.loads(state.read_text())["argv"]
    assert saved == ["router", "--model", "/m", "--registry", "redis://r"]
    assert execs[0][1:] == ["-m", "tandem.cli", *saved]


def test_health_without_state_file_is_unhealthy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TANDEM_STATE_FILE", str(tmp_path / "missing.json"))
    assert container.main(["health"]) == 1
    assert "unhealthy" in capsys.readouterr().out
    assert container.main(["bogus"]) == 2
