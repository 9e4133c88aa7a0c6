"""The model runner: executes one ``SchedulerOutput`` and returns a ``RunnerOutput``.

Owns the model weights, the device KV tensors, the host KV tier (pinned on CUDA, int8
with ``swap_int8``) and the sampler. Per iteration: swap copies (``KVSwapper``: those
this batch needs complete first, those ahead of need overlap the forward pass on CUDA),
input preparation, one forward pass over the flat batch, logits only for rows that
sample, sampling. On CUDA with the Triton backend, a decode-only batch replays a captured
CUDA graph instead (``DecodeGraphs``); anything else runs eagerly.
"""

from __future__ import annotations

import torch

from tandem import env
from tandem.attention import default_backend_name, get_backend
from tandem.config import EngineConfig, ModelConfig
from tandem.models import load_model
from tandem.runner.host_kv import HostKVTier
from tandem.runner.inputs import prepare_inputs
from tandem.runner.kv_swap import KVSwapper
from tandem.runner.kv_tensors import KVTensors
from tandem.runner.sampler import Sampler, SamplingRow
from tandem.sched.output import RunnerOutput, SchedulerOutput

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
            )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        if self.swapper is not None:
            out.swap = self.swapper.run(sched)
        elif sched.swaps_out or sched.swaps_in or sched.copies_cache:
            raise AssertionError("swap scheduled without a host tier")
        if not sched.chunks:
            return out
        if self.graphs is not None and self.graphs.can_run(sched):
            logits = self.graphs.run(sched)
            picked = [i for i, c in enumerate(sched.chunks) if c.sample]
            if len(picked) < len(sched.chunks):
                logits = logits[picked]
            return self._sample(sched, picked, logits, out)
        inputs = prepare_inputs(
            sched, self.block_size, self.model_config.sliding_window, self.device
        )
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv.layers(), inputs.meta, self.backend
        )
        if not inputs.sample_rows:
            return out
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [N, vocab] float32
        return self._sample(sched, inputs.sample_chunks, logits, out)

    def _sample(
        self, sched: SchedulerOutput, picked: list[int], logits: torch.Tensor, out: RunnerOutput
    ) -> RunnerOutput:
        if not picked:
            return out
        chunks = [sched.chunks[i] for i in picked]
        rows = [
            SamplingRow(
                params=c.request.sampling_params,
                prompt_token_ids=c.request.prompt_token_ids,
                output_token_ids=c.request.output_token_ids,
                eos_token_ids=c.request.eos_token_ids,
            )
            for c in chunks
        ]
        result = self.sampler(logits, rows)
        for c, token, lp in zip(chunks, result.token_ids, result.logprobs, strict=True):
            out.sampled[c.request.request_id] = int(token)
            if lp is not None:
                out.logprobs[c.request.request_id] = lp
        return out

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
