"""``tandem.supervisor`` with stand-in workers (``python -c`` scripts, no model): restart with
backoff, start-up failures, restarts off, the fatal callback, stop()."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time

import pytest

from tandem.supervisor import Backoff, SlotState, Supervisor, WorkerSpec, describe_exit

# A worker that does the handshake on --ready-fd, then lives until killed (or exits with
# the status in $EXIT after the handshake when given).
READY = """
import os, sys, time
fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
os.write(fd, b"TANDEM_WORKER_READY 127.0.0.1:1\\n")
os.close(fd)
time.sleep(600)
"""
NEVER_READY = "import sys; sys.exit(3)"
FAST = Backoff(base_s=0.1, factor=2.0, max_s=0.4, reset_after_s=60.0)


def _spec(script: str, role: str = "decode-worker", address: str = "127.0.0.1:1") -> WorkerSpec:
    return WorkerSpec(role, "colocated", address, (sys.executable, "-c", script))


def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_backoff_doubles_up_to_its_cap():
    b = Backoff(base_s=1.0, factor=2.0, max_s=30.0)
    assert [b.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    with pytest.raises(ValueError):
        Backoff(base_s=0)


def test_describe_exit():
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(2) == "exit status 2"
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"


def test_a_killed_worker_is_restarted_with_growing_delays(caplog):
    caplog.set_level(logging.INFO, logger="tandem.serve")
    sup = Supervisor([_spec(READY)], backoff=FAST, poll_s=0.02)
    sup.start()
    try:
        slot = sup.slots[0]
        pids = []
        for restart in range(1, 5):
            _until(lambda: slot.state is SlotState.READY)
            pids.append(slot.pid)
            os.kill(slot.pid, signal.SIGKILL)
            _until(lambda r=restart: slot.restarts == r and slot.state is SlotState.READY)
        pids.append(slot.pid)
        assert len(set(pids)) == 5 and slot.deaths == 4
        text = caplog.text
        delays = re.findall(r"killed by signal 9 \(SIGKILL\); restarting it in ([\d.]+) s", text)
        assert delays == ["0.1", "0.2", "0.4", "0.4"]  # doubling, then capped
        assert f"restarting colocated worker 127.0.0.1:1 as pid {pids[1]} (restart 1)" in text
        assert f"colocated worker 127.0.0.1:1 is back (pid {pids[4]}, restart 4)" in text
        assert sup.fatal is None
    finally:
        sup.stop(grace_s=5)
    assert slot.proc.poll() is not None


def test_a_worker_that_never_starts_is_not_restarted_and_is_fatal():
    reasons = []
    sup = Supervisor([_spec(NEVER_READY)], backoff=FAST, on_fatal=reasons.append, poll_s=0.02)
    sup.start()
    try:
        _until(lambda: reasons)
        assert reasons == ["every decode-worker process exited (exit status 3)"]
        assert sup.slots[0].state is SlotState.FAILED and sup.slots[0].restarts == 0
    finally:
        sup.stop(grace_s=5)


def test_restarts_off_a_role_with_a_survivor_keeps_serving(caplog):
    reasons = []
    sup = Supervisor(
        [_spec(READY, address="127.0.0.1:1"), _spec(READY, address="127.0.0.1:2"),
         _spec(READY, role="prefill-worker", address="127.0.0.1:3")],
        restart=False, backoff=FAST, on_fatal=reasons.append, poll_s=0.02,
    )  # fmt: skip
    sup.start()
    try:
        a, b, prefill = sup.slots
        _until(lambda: all(s.state is SlotState.READY for s in sup.slots))
        os.kill(a.pid, signal.SIGKILL)
        _until(lambda: a.state is SlotState.FAILED)
        time.sleep(0.2)
        assert reasons == [] and b.state is SlotState.READY  # one decode worker is left
        assert "not restarting it (--no-restart-workers)" in caplog.text
        os.kill(b.pid, signal.SIGTERM)
        _until(lambda: reasons)
        assert reasons == [
            "every decode-worker process exited (killed by signal 9 (SIGKILL), "
            "killed by signal 15 (SIGTERM))"
        ]
        assert prefill.state is SlotState.READY
    finally:
        sup.stop(grace_s=5)
    assert prefill.proc.poll() is not None


def test_stop_ends_restarts_and_every_worker():
    sup = Supervisor([_spec(READY), _spec(READY, address="127.0.0.1:2")], backoff=FAST)
    sup.start()
    _until(lambda: all(s.state is SlotState.READY for s in sup.slots))
    procs = [s.proc for s in sup.slots]
    sup.stop(grace_s=5)
    assert all(p.poll() is not None for p in procs)
    time.sleep(0.3)
    assert [s.proc for s in sup.slots] == procs  # nothing was started again


def test_a_long_enough_life_starts_the_backoff_over(caplog):
    sup = Supervisor([_spec(READY)], backoff=Backoff(0.1, 2.0, 5.0, reset_after_s=0.5))
    sup.start()
    try:
        slot = sup.slots[0]
        for restart in (1, 2):
            _until(lambda: slot.state is SlotState.READY)
            os.kill(slot.pid, signal.SIGKILL)
            _until(lambda r=restart: slot.restarts == r and slot.state is SlotState.READY)
        assert slot.deaths == 2  # died again at once: the delay doubled
        time.sleep(0.6)
        os.kill(slot.pid, signal.SIGKILL)
        _until(lambda: slot.restarts == 3 and slot.state is SlotState.READY)
        assert slot.deaths == 1
        delays = re.findall(r"restarting it in ([\d.]+) s", caplog.text)
        assert delays == ["0.1", "0.2", "0.1"]
    finally:
        sup.stop(grace_s=5)
