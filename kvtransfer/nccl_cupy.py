"""The real communicator of the ``nccl`` backend: CuPy's NCCL bindings (GPU only).

CuPy is imported when ``CupyComms`` is built, never at package import: the project does
not depend on it. Every communicator gets its own CUDA stream; tensors move as raw bytes
(``NCCL_UINT8``, ``numel * element_size`` of them), so any dtype (bfloat16 included) is
bit-exact without a dtype mapping. Completion is observed by polling a CUDA event from the
worker thread, which also notices ``abort`` (``ncclCommAbort`` ends the NCCL kernels; the
poll then raises ``CommError``) and NCCL's asynchronous errors.

CuPy API used (checked against cupy 13/14): ``cupy.cuda.nccl.get_unique_id()`` (bytes in
CuPy 14, a tuple of 128 signed chars before), ``NcclCommunicator(ndev, uid, rank)`` (takes
the same type back), ``.send(ptr, count, datatype, peer, stream_ptr)``,
``.recv(ptr, count, datatype, peer, stream_ptr)``, ``.abort()``, ``.check_async_error()``
(where present), ``NCCL_UINT8``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvtransfer.comm import Comm, CommError, CommFactory

ASYNC_CHECK_S = 0.5  # how often a waiting poll asks NCCL for asynchronous errors
SPIN_POLLS = 2000  # polls that only yield the GIL before the poll starts sleeping


def load_cupy() -> tuple[Any, Any]:
    """(``cupy.cuda.nccl``, ``cupy.cuda.Device``); ``RuntimeError`` saying what to install."""
    try:
        from cupy.cuda import Device, nccl
    except ImportError as e:
        raise RuntimeError(
            "the nccl KV transfer backend needs CuPy with NCCL (pip install cupy-cuda13x, or "
            f"cupy-cuda12x on CUDA 12); importing it failed: {e}"
        ) from e
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy is installed but could not load the NCCL library")
    return nccl, Device


def uid_to_bytes(uid: Any) -> bytes:
    """CuPy's unique id (bytes, or a tuple of signed chars in CuPy < 14) as bytes."""
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    return bytes(int(b) & 0xFF for b in uid)


def new_communicator(nccl: Any, uid: bytes, rank: int) -> Any:
    """A 2-rank ``NcclCommunicator`` on the current device (blocks until the peer joins)."""
    try:
        return nccl.NcclCommunicator(2, uid, rank)
    except TypeError:  # CuPy < 14 takes the id as a tuple of signed chars
        chars = tuple(b - 256 if b > 127 else b for b in uid)
        return nccl.NcclCommunicator(2, chars, rank)


def _cuda_index(device: str) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise CommError(f"the nccl KV transfer backend needs a CUDA device, got {device!r}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


class CupyComms(CommFactory):
    def __init__(self) -> None:
        self.nccl, self.cupy_device = load_cupy()

    def unique_id(self) -> bytes:
        return uid_to_bytes(self.nccl.get_unique_id())

    def connect(self, uid: bytes, rank: int, device: str) -> CupyComm:
        index = _cuda_index(device)
        try:
            # NCCL binds the communicator to the calling thread's current device.
            with torch.cuda.device(index), self.cupy_device(index):
                comm = new_communicator(self.nccl, bytes(uid), rank)
                stream = torch.cuda.Stream(device=index)
        except Exception as e:
            raise CommError(f"NCCL communicator set-up failed on cuda:{index}: {e}") from e
        return CupyComm(self, comm, stream, rank, index)


class CupyComm(Comm):
    def __init__(
        self, cupy: CupyComms, comm: Any, stream: torch.cuda.Stream, rank: int, index: int
    ) -> None:
        self.nccl, self.cupy_device = cupy.nccl, cupy.cupy_device
        self.comm, self.stream = comm, stream
        self.rank, self.index = rank, index
        self.peer = 1 - rank
        self._aborted = False
        self._lock = threading.Lock()
        # Tensors of a call that did not complete: kept until close, so an aborted kernel
        # never touches memory that the caching allocator gave to someone else.
        self._held: list[torch.Tensor] = []

    def send(self, tensor: torch.Tensor) -> None:
        self._call("send", self.comm.send, tensor)

    def recv(self, tensor: torch.Tensor) -> None:
        self._call("recv", self.comm.recv, tensor)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        # Allocated on the communicator's stream: the caching allocator orders its reuse
        # after the receive; the consumer (KVTensors.scatter) records its own stream.
        with torch.cuda.device(self.index), torch.cuda.stream(self.stream):
            return torch.empty(tuple(shape), dtype=dtype, device=f"cuda:{self.index}")

    def _call(self, what: str, op: Any, tensor: torch.Tensor) -> None:
        if self._aborted:
            raise CommError("the communicator was aborted")
        if tensor.device != torch.device("cuda", self.index) or not tensor.is_contiguous():
            raise CommError(
                f"NCCL {what} needs a contiguous tensor on cuda:{self.index}, got one on "
                f"{tensor.device} (contiguous: {tensor.is_contiguous()})"
            )
        nbytes = tensor.numel() * tensor.element_size()
        self._held.append(tensor)
        try:
            with torch.cuda.device(self.index), self.cupy_device(self.index):
                op(
                    tensor.data_ptr(),
                    nbytes,
                    self.nccl.NCCL_UINT8,
                    self.peer,
                    self.stream.cuda_stream,
                )
                done = torch.cuda.Event()
                done.record(self.stream)
            self._wait(done, what)
        except CommError:
            raise
        except Exception as e:
            raise CommError(f"NCCL {what} of {nbytes} bytes failed: {e}") from e
        self._held.pop()  # calls run one at a time on one thread: the last one is ours

    def _wait(self, done: torch.cuda.Event, what: str) -> None:
        polls = 0
        next_check = time.monotonic() + ASYNC_CHECK_S
        while not done.query():
            if self._aborted:
                raise CommError(f"NCCL {what} aborted")
            polls += 1
            time.sleep(0 if polls < SPIN_POLLS else 50e-6)
            if time.monotonic() > next_check:
                next_check += ASYNC_CHECK_S
                with self._lock:  # never while abort() tears the communicator down
                    check = getattr(self.comm, "check_async_error", None)
                    if check is not None and not self._aborted:
                        check()  # raises NcclError for an asynchronous NCCL failure

    def abort(self) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self.comm.abort()

    def close(self) -> None:
        # Abort, not destroy: ncclCommDestroy may wait on the peer, which may be gone.
        self.abort()
        self._held.clear()
