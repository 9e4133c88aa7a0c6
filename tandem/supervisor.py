"""``tandem serve``'s worker processes: start them, notice deaths, restart them with backoff.

A slot is one worker process's place: its role, its command line and its fixed control port
(the router knows workers by address, so a restarted worker listens where the dead one did and
the router reconnects by itself). A slot's life:

1. ``start()`` spawns every slot with a pipe for the worker's ready handshake: ``--ready-fd FD``
   makes the worker write ``TANDEM_WORKER_READY HOST:PORT`` there once it listens (STARTING ->
   READY). The handshake stays on that pipe; users see the start-up summary instead.
2. The watch thread polls the processes and reads the handshakes. A process that exits before
   the slot was ever READY failed to start (bad flags, too little memory): it is not restarted,
   since the same command would fail the same way (-> FAILED).
3. A process that exits after it served (killed, crashed, OOM) is logged with its exit status
   and, unless restarts are off, started again after a backoff (-> WAITING -> STARTING): the
   delay doubles with each death in a row, up to ``Backoff.max_s``, and the count starts over
   once a process has stayed up ``Backoff.reset_after_s``. With restarts off it is FAILED.
4. When every slot of a role is FAILED, nothing can serve that role's part of a request:
   ``on_fatal(reason)`` is called once, and ``tandem serve`` stops, so that an outer supervisor
   (docker, systemd) sees it exit rather than a server that cannot answer.
5. ``stop()`` ends restarts, sends SIGTERM to every process and SIGKILL after a grace period.

Pure: no torch, no asyncio (the router's event loop runs in the main thread meanwhile).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("tandem.serve")

READY_LINE = "TANDEM_WORKER_READY"  # the worker's handshake on its --ready-fd pipe


class SlotState(enum.Enum):
    STARTING = "starting"  # spawned, no handshake yet
    READY = "ready"  # listening
    WAITING = "waiting"  # died; restarted at ``restart_at``
    FAILED = "failed"  # exited, not restarted (start-up failure, or restarts off)


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number ``n`` of a run of deaths: base · factor^(n-1), capped."""

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    reset_after_s: float = 60.0  # up this long: the next death counts as the first again

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and self.factor >= 1 and self.max_s >= self.base_s):
            raise ValueError(f"bad backoff {self}: need base_s > 0, factor >= 1, max_s >= base_s")

    def delay(self, deaths_in_a_row: int) -> float:
        return min(self.base_s * self.factor ** max(deaths_in_a_row - 1, 0), self.max_s)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: ``argv`` (without ``--ready-fd``) serves on ``address``."""

    role: str  # the CLI subcommand: decode-worker | prefill-worker
    kind: str  # what it does, for messages: colocated | decode | prefill
    address: str  # HOST:PORT it listens on (fixed: restarts reuse it)
    argv: tuple[str, ...]


@dataclass
class Slot:
    spec: WorkerSpec
    state: SlotState = SlotState.STARTING
    proc: subprocess.Popen | None = None
    ready_fd: int | None = None  # read end of the handshake pipe while STARTING
    ready_buf: bytes = b""
    ready_at: float | None = None  # monotonic time of the current process's handshake
    served: bool = False  # some process of this slot got READY once
    deaths: int = 0  # in a row (reset after a long enough life)
    restarts: int = 0  # in total
    restart_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def name(self) -> str:
        return f"{self.spec.kind} worker {self.spec.address}"


def describe_exit(code: int) -> str:
    """``exit status 1`` / ``killed by signal 9 (SIGKILL)`` for a Popen returncode."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


class Supervisor:
    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        restart: bool = True,
        backoff: Backoff = Backoff(),
        on_fatal: Callable[[str], None] | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.slots = [Slot(spec) for spec in specs]
        self.restart = restart
        self.backoff = backoff
        self.on_fatal = on_fatal
        self.poll_s = poll_s
        self.fatal: str | None = None  # why serving stopped, once it has
        self._lock = threading.Lock()  # spawns and stop() never interleave
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)
        self._thread.start()

    def stop(self, grace_s: float = 10.0) -> None:
        """No more restarts; SIGTERM every worker, SIGKILL those still there after ``grace_s``."""
        with self._lock:
            self._stopping.set()
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for slot in self.slots:
            self._close_ready(slot)

    # ------------------------------------------------------------------ watch thread
    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._read_handshakes()
            now = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                for slot in self.slots:
                    if slot.state in (SlotState.STARTING, SlotState.READY):
                        assert slot.proc is not None
                        code = slot.proc.poll()
                        if code is not None:
                            self._exited(slot, code, now)
                    elif slot.state is SlotState.WAITING and now >= slot.restart_at:
                        slot.restarts += 1
                        self._spawn(slot)
                reason = self._fatal_reason()
            if reason is not None:
                self.fatal = reason
                log.error("%s; stopping", reason)
                if self.on_fatal is not None:
                    self.on_fatal(reason)
                return

    def _read_handshakes(self) -> None:
        fds = {s.ready_fd: s for s in self.slots if s.ready_fd is not None}
        if not fds:
            time.sleep(self.poll_s)
            return
        readable, _, _ = select.select(list(fds), [], [], self.poll_s)
        for fd in readable:
            slot = fds[fd]
            data = os.read(fd, 4096)
            if not data:  # the worker closed it (it is exiting): poll() tells the rest
                self._close_ready(slot)
                continue
            slot.ready_buf += data
            if READY_LINE.encode() in slot.ready_buf and b"\n" in slot.ready_buf:
                with self._lock:
                    if slot.state is SlotState.STARTING:
                        slot.state, slot.ready_at, slot.served = (
                            SlotState.READY,
                            time.monotonic(),
                            True,
                        )
                        if slot.restarts:
                            log.warning(
                                "%s is back (pid %d, restart %d)",
                                slot.name,
                                slot.pid,
                                slot.restarts,
                            )
                self._close_ready(slot)

    def _exited(self, slot: Slot, code: int, now: float) -> None:
        self._close_ready(slot)
        slot.exit_codes.append(code)
        how = describe_exit(code)
        if not slot.served:
            slot.state = SlotState.FAILED
            log.error("%s (pid %d) failed to start: %s", slot.name, slot.pid, how)
            return
        if not self.restart:
            slot.state = SlotState.FAILED
            log.error(
                "%s (pid %d) exited: %s; not restarting it (--no-restart-workers)",
                slot.name,
                slot.pid,
                how,
            )
            return
        if slot.ready_at is not None and now - slot.ready_at >= self.backoff.reset_after_s:
            slot.deaths = 0
        slot.deaths += 1
        delay = self.backoff.delay(slot.deaths)
        slot.state, slot.restart_at, slot.ready_at = SlotState.WAITING, now + delay, None
        log.warning(
            "%s (pid %d) exited: %s; restarting it in %.1f s", slot.name, slot.pid, how, delay
        )

    def _fatal_reason(self) -> str | None:
        for role in dict.fromkeys(s.spec.role for s in self.slots):
            mine = [s for s in self.slots if s.spec.role == role]
            if all(s.state is SlotState.FAILED for s in mine):
                codes = ", ".join(describe_exit(s.exit_codes[-1]) for s in mine)
                return f"every {role} process exited ({codes})"
        return None

    # ------------------------------------------------------------------ helpers (lock held)
    def _spawn(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        argv = [*slot.spec.argv, "--ready-fd", str(write_fd)]
        try:
            slot.proc = subprocess.Popen(argv, pass_fds=(write_fd,))
        except OSError as e:  # e.g. out of processes: counts as a death
            os.close(read_fd)
            slot.state, slot.restart_at = SlotState.WAITING, time.monotonic() + self.backoff.max_s
            log.error(
                "could not start %s: %s; trying again in %.0f s", slot.name, e, self.backoff.max_s
            )
            return
        finally:
            os.close(write_fd)
        slot.state, slot.ready_fd, slot.ready_buf = SlotState.STARTING, read_fd, b""
        if slot.restarts:
            log.warning("restarting %s as pid %d (restart %d)", slot.name, slot.pid, slot.restarts)
        else:
            log.info("started %s as pid %d", slot.name, slot.pid)

    def _close_ready(self, slot: Slot) -> None:
        if slot.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(slot.ready_fd)
            slot.ready_fd = None
