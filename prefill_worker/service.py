"""Prefill worker service: chunked prefill here, decode elsewhere (disaggregated mode).

A request's life in this process:

1. The router sends ``submit`` with ``decode_kv`` (the KV address of the decode worker it
   chose, which it has already told to ``expect`` the request). The engine queues it; the
   MLFQ and the token budget batch its chunks with other prompts (Sarathi-Serve).
2. The iteration that completes the prompt samples the first token, which is streamed to
   the router at once: TTFT does not wait for the KV handoff.
3. Right after that iteration the engine thread exports the request (its blocks leave the
   scheduler, the K/V bytes are gathered), and the KV sender moves state + bytes to the
   decode worker (two-sided handshake, compat hash, lease; kvtransfer/base.py). The offer
   names the full blocks (prefix cache): the decode worker shares those it has cached
   and only the rest are sent. With prefix caching the prompt's blocks stay cached here
   after the export, so a later prompt with the same prefix computes only the rest.
4. DONE: the blocks here are freed and the router is told ``handoff``, so tokens now come
   from the decode worker. Failure (refused, timeout, decode worker gone): the request is
   imported back into this engine and decodes here (colocated fallback), so nothing
   accepted is lost. A request aborted while its handoff was in flight is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from decode_worker.service import WorkerService, _Conn
from kvtransfer import KVBundle, TransferError
from tandem.protocol import Handoff, Submit
from tandem.request_state import request_state

log = logging.getLogger("tandem.prefill_worker")


class PrefillWorkerService(WorkerService):
    def __init__(self, engine: Any, kv_sender: Any, **kwargs: Any) -> None:
        super().__init__(engine, role="prefill", **kwargs)
        self.kv_sender = kv_sender
        self._dest: dict[str, str] = {}  # request id -> decode worker KV address (engine thread)
        self._in_transfer: set[str] = set()
        self._aborted_in_transfer: set[str] = set()
        self.handoffs_ok = 0
        self.handoffs_failed = 0

    # ------------------------------------------------------------------ engine thread
    def _submit(self, conn: _Conn, msg: Submit) -> None:
        super()._submit(conn, msg)
        rid = msg.request_id
        if rid in self._owner and msg.decode_kv:
            self._dest[rid] = msg.decode_kv

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self._in_transfer:
                self._aborted_in_transfer.add(rid)
            self._dest.pop(rid, None)
        super()._abort(request_ids)

    def after_step(self, outputs: list[Any]) -> None:
        for out in outputs:
            rid = out.request_id
            if out.finished:
                self._dest.pop(rid, None)  # finished on its first token: nothing to hand off
                continue
            dest = self._dest.get(rid)
            if dest is None or not out.token_ids:
                continue
            del self._dest[rid]
            req = self.engine.scheduler.requests[rid]
            names = self._block_names(rid, req.num_computed_tokens)
            exported = self.engine.export_request(rid)
            state = request_state(
                exported.request, exported.num_computed_tokens, exported.policy_state
            )
            bundle = KVBundle(rid, exported.num_computed_tokens, exported.payload, state, names)
            self._in_transfer.add(rid)
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(
                self._hand_off(rid, dest, bundle, exported), self._loop
            )

    def _block_names(self, rid: str, num_tokens: int) -> tuple[bytes, ...]:
        """Names of the request's full blocks, so a decode worker that has cached some of
        them receives only the rest (a fake engine names none)."""
        fn = getattr(self.engine, "block_names", None)
        return tuple(fn(rid, num_tokens)) if fn is not None else ()

    def _finish_handoff(
        self, rid: str, exported: Any, ok: bool, maybe_committed: bool = False
    ) -> None:
        self._in_transfer.discard(rid)
        aborted = rid in self._aborted_in_transfer
        self._aborted_in_transfer.discard(rid)
        conn = self._owner.get(rid)
        if ok:
            self.handoffs_ok += 1
            self._owner.pop(rid, None)
            if conn is not None:
                conn.requests.discard(rid)
                self._send(conn, Handoff(rid))
            return
        self.handoffs_failed += 1
        if aborted or conn is None:
            return  # nobody waits for it any more: its blocks were freed by the export
        if maybe_committed:
            # The decode worker may already run it: decoding here too would duplicate every
            # token. Hand the decision to the router, which aborts both ends and re-runs it.
            self._lose(conn, rid, "handoff outcome unknown")
            return
        try:
            self.engine.import_request(exported)  # decode it here instead
        except Exception as e:  # e.g. no free blocks left here any more
            log.warning("cannot take %s back after a failed handoff: %s", rid, e)
            self._lose(conn, rid, f"handoff failed and no room to decode locally ({e})")

    # ------------------------------------------------------------------ asyncio side
    async def _hand_off(self, rid: str, dest: str, bundle: KVBundle, exported: Any) -> None:
        maybe = False
        try:
            await self.kv_sender.send(dest, bundle)
            ok = True
        except TransferError as e:
            log.warning("handoff of %s to %s failed (%s)", rid, dest, e)
            ok, maybe = False, e.maybe_committed
        except Exception:
            log.exception("handoff of %s to %s crashed", rid, dest)
            ok = False
        self._post(lambda: self._finish_handoff(rid, exported, ok, maybe))

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["handoffs_ok"] = self.handoffs_ok
        s["handoffs_failed"] = self.handoffs_failed
        s["queued_prefill_tokens"] = sum(
            r.num_uncomputed_tokens for r in self.engine.scheduler.waiting
        )
        return s
