"""The model runner: executes one ``SchedulerOutput`` and returns a ``RunnerOutput``.

Owns the model weights, the device KV tensors, the host KV tensors (second tier) and
the sampler. Per iteration: swap-out copies, swap-in copies, input preparation, one
forward pass over the flat batch, logits only for rows that sample, sampling.
"""

from __future__ import annotations

import torch

from tandem.attention import get_backend
from tandem.config import EngineConfig, ModelConfig
from tandem.models import load_model
from tandem.runner.inputs import prepare_inputs
from tandem.runner.kv_tensors import KVTensors, copy_blocks
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
            KVTensors(
                model_config,
                cache.num_host_blocks,
                cache.block_size,
                self.dtype,
                "cpu",
                pin_memory=self.device.type == "cuda",
            )
            if cache.num_host_blocks > 0
            else None
        )
        self.backend = get_backend("torch")
        self.sampler = Sampler(seed=config.seed)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for copy in sched.swap_out:
            assert self.host_kv is not None, "swap-out scheduled without a host tier"
            copy_blocks(self.kv, copy.src, self.host_kv, copy.dst)
        for copy in sched.swap_in:
            assert self.host_kv is not None, "swap-in scheduled without a host tier"
            copy_blocks(self.host_kv, copy.src, self.kv, copy.dst)
        out = RunnerOutput()
        if not sched.chunks:
            return out
        inputs = prepare_inputs(
            sched, self.block_size, self.model_config.sliding_window, self.device
        )
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv.layers(), inputs.meta, self.backend
        )
        if not inputs.sample_rows:
            return out
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [N, vocab] float32
        chunks = [sched.chunks[i] for i in inputs.sample_chunks]
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
    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv.gather(block_ids)

    def scatter_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        self.kv.scatter(block_ids, payload)
