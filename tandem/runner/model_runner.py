"""The model runner: executes one ``SchedulerOutput`` and returns a ``RunnerOutput``.

Owns the model weights, the device KV tensors, the host KV tier (pinned on CUDA, int8
with ``swap_int8``) and the sampler. Per iteration: swap copies (``KVSwapper``: those
this batch needs complete first, those ahead of need overlap the forward pass on CUDA),
input preparation, one forward pass over the flat batch, logits only for rows that
sample, sampling. On CUDA with the Triton backend, a decode-only batch replays a captured
CUDA graph instead (``DecodeGraphs``); anything else runs eagerly.

``launch`` queues an iteration and returns at once; ``collect`` waits for its sampled ids
(``execute`` = both). With async scheduling the engine launches iteration N+1 before it
collects N: a token of N+1 that N sampled is ``PLACEHOLDER_TOKEN`` on the host and is
taken on the device from the SAMPLED row of ``stage``. Pinned host buffers that a queued
copy may still read are never rewritten before it ran (an event, or two alternating
buffers for the sampled ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem import env
from tandem.attention import default_backend_name, get_backend
from tandem.config import EngineConfig, ModelConfig
from tandem.models import load_model
from tandem.runner.host_kv import HostKVTier
from tandem.runner.inputs import device_tensor, prepare_inputs
from tandem.runner.kv_swap import KVSwapper
from tandem.runner.kv_tensors import KVTensors
from tandem.runner.sampler import (
    LogprobTensors,
    Sampler,
    SamplingRow,
    is_plain_greedy,
    logprob_tensors,
)
from tandem.runner.stage import StageRows
from tandem.sched.output import RunnerOutput, ScheduledChunk, SchedulerOutput, SwapIO

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LaunchedStep:
    """An iteration queued on the device; ``ModelRunner.collect`` turns it into a
    ``RunnerOutput``. ``host[rows[j]]`` will hold the id sampled for ``request_ids[j]``
    once ``event`` has fired (CPU: at once)."""

    swap: SwapIO = field(default_factory=SwapIO)
    request_ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    logprobs: LogprobTensors | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.model = load_model(config.model, model_config, str(self.device), self.dtype)
        cache = config.cache
        self.block_size = cache.block_size
        self.kv = KVTensors(
            model_config, cache.num_blocks, cache.block_size, self.dtype, self.device
        )
        self.host_kv = (
            HostKVTier(
                model_config,
                cache.num_host_blocks,
                cache.block_size,
                self.dtype,
                int8=cache.swap_int8,
                pin_memory=self.device.type == "cuda",
            )
            if cache.num_host_blocks > 0
            else None
        )
        self.swapper = KVSwapper(self.kv, self.host_kv) if self.host_kv is not None else None
        name = config.attention
        self.backend = get_backend(default_backend_name(config.device) if name == "auto" else name)
        self.sampler = Sampler(seed=config.seed)
        # Per-row int32 step inputs and the sampled ids of the last launched iteration
        # (rows: StageRows); CUDA graphs read their inputs from it.
        n = config.scheduler.max_num_seqs
        self.stage = torch.zeros((StageRows.COUNT, n), dtype=torch.int32, device=self.device)
        self._rows: dict[str, int] = {}  # request id -> SAMPLED row, last launched iteration
        self._flip = 0
        self._host_ids = (
            [torch.zeros(n, dtype=torch.int32).pin_memory() for _ in range(2)]
            if self.device.type == "cuda"
            else []
        )
        self.graphs = None
        mc = model_config
        self.backend.warm_up(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, cache.block_size, self.dtype,
            self.device, mc.sliding_window,
        )  # fmt: skip
        if (
            self.device.type == "cuda"
            and self.backend.name == "triton"
            and config.cuda_graphs
            and env.cuda_graphs_enabled()
        ):
            from tandem.runner.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv.layers(),
                self.backend,
                max_batch=config.scheduler.max_num_seqs,
                max_model_len=config.scheduler.max_model_len
                or model_config.max_position_embeddings,
                block_size=cache.block_size,
                sliding_window=model_config.sliding_window,
                stage=self.stage,
            )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one iteration and read its sampled ids (synchronous stepping)."""
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Queue one iteration on the device and return without waiting for it.

        A chunk token ``PLACEHOLDER_TOKEN`` stands for the id that the previous launched
        iteration sampled for that request: it is taken on the device from the SAMPLED
        row of ``stage``, where every iteration leaves its sampled ids. ``collect`` reads
        them (after the next iteration has been launched, with async scheduling)."""
        step = LaunchedStep()
        if self.swapper is not None:
            step.swap = self.swapper.run(sched)
        elif sched.swaps_out or sched.swaps_in or sched.copies_cache:
            raise AssertionError("swap scheduled without a host tier")
        if not sched.chunks:
            return step
        prev, self._rows = self._rows, {}
        picked = [i for i, c in enumerate(sched.chunks) if c.sample]
        chunks = [sched.chunks[i] for i in picked]
        rows = [self._sampling_row(c) for c in chunks]
        stage = self.stage
        sampled_row = stage[StageRows.SAMPLED]
        if self.graphs is not None and self.graphs.can_run(sched):
            src = [prev[c.request.request_id] if c.token_ids[0] < 0 else None
                   for c in sched.chunks]  # fmt: skip
            logits = self.graphs.run(sched, src)  # argmax of every row is in sampled_row
            out_rows = picked
            plain = all(is_plain_greedy(r) for r in rows)
            if picked and (not plain or any(r.params.logprobs is not None for r in rows)):
                index = device_tensor(picked, torch.long, self.device)
                if len(picked) < len(sched.chunks):
                    logits = logits.index_select(0, index)
                logits = logits.float()
                if plain:  # the graph's argmax stands; logprobs of it
                    tokens = sampled_row.index_select(0, index).long()
                else:
                    tokens = self.sampler.sample(logits, rows)
                    sampled_row.index_copy_(0, index, tokens.to(torch.int32))
                step.logprobs = logprob_tensors(logits, rows, tokens)
        else:
            inputs = prepare_inputs(
                sched, self.block_size, self.model_config.sliding_window, self.device
            )
            if inputs.placeholders:
                at = device_tensor([t for t, _ in inputs.placeholders], torch.long, self.device)
                src_rows = [
                    prev[sched.chunks[i].request.request_id] for _, i in inputs.placeholders
                ]
                take = device_tensor(src_rows, torch.long, self.device)
                inputs.input_ids.index_copy_(0, at, sampled_row.index_select(0, take).long())
            hidden = self.model(
                inputs.input_ids, inputs.positions, self.kv.layers(), inputs.meta, self.backend
            )
            out_rows = list(range(len(picked)))
            if picked:
                rows_at = device_tensor(inputs.sample_rows, torch.long, self.device)
                logits = self.model.compute_logits(hidden.index_select(0, rows_at))  # [N, V]
                tokens = self.sampler.sample(logits, rows)
                sampled_row[: len(picked)].copy_(tokens)
                step.logprobs = logprob_tensors(logits, rows, tokens)
        step.request_ids = [c.request.request_id for c in chunks]
        step.rows = out_rows
        self._rows = dict(zip(step.request_ids, out_rows, strict=True))
        width = max(out_rows, default=-1) + 1
        self._read_back(step, sampled_row[:width])
        return step

    def _read_back(self, step: LaunchedStep, tokens: torch.Tensor) -> None:
        """Start the copy of the sampled ids (and logprobs) to the host."""
        if not tokens.is_cuda:
            step.host = tokens.clone()  # the next launch overwrites the row
            return
        self._flip ^= 1
        host = self._host_ids[self._flip]  # the other one may still be read by collect
        step.host = host[: tokens.shape[0]]
        step.host.copy_(tokens, non_blocking=True)
        if step.logprobs is not None:
            step.logprobs = step.logprobs.to_host(non_blocking=True)
        step.event = torch.cuda.Event()
        step.event.record()

    def collect(self, step: LaunchedStep) -> RunnerOutput:
        """Wait for a launched iteration's sampled ids and return them."""
        out = RunnerOutput(swap=step.swap)
        if not step.request_ids:
            return out
        if step.event is not None:
            step.event.synchronize()
        assert step.host is not None
        ids = step.host.tolist()
        lps = step.logprobs.lists(len(step.rows)) if step.logprobs is not None else None
        for j, (rid, row) in enumerate(zip(step.request_ids, step.rows, strict=True)):
            out.sampled[rid] = ids[row]
            if lps is not None and lps[j] is not None:
                out.logprobs[rid] = lps[j]
        return out

    @staticmethod
    def _sampling_row(c: ScheduledChunk) -> SamplingRow:
        r = c.request
        return SamplingRow(
            params=r.sampling_params,
            prompt_token_ids=r.prompt_token_ids,
            output_token_ids=r.output_token_ids,
            eos_token_ids=r.eos_token_ids,
            num_pending=r.num_pending_tokens,
        )

    # Byte half of export/import between engines (handoff, migration).
    # Swaps ahead of need may still be copying device blocks: let them land first.
    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A complete copy of the blocks: on CUDA the gather has finished when this returns,
        so a KV sender may read it on any thread and stream (NCCL on its own stream)."""
        if self.swapper is not None:
            self.swapper.wait_all()
        payload = self.kv.gather(block_ids)
        if payload.is_cuda:
            torch.cuda.current_stream(payload.device).synchronize()
        return payload

    def scatter_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        if self.swapper is not None:
            self.swapper.wait_all()
        self.kv.scatter(block_ids, payload)
