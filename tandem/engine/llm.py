"""The offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``.

Prompts are strings (tokenized with the model's tokenizer, special tokens such as BOS
added as the tokenizer does) or lists of token ids. All prompts are submitted at once so
they share continuous batches; results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, kv_block_bytes
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.outputs import RequestOutput
from tandem.random_model import resolve_model
from tandem.request import SamplingParams

Prompt = str | Sequence[int]

# On CPU the KV cache defaults to this many bytes when --kv-blocks is not given.
DEFAULT_CPU_KV_BYTES = 512 * 2**20


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class LLM:
    """``LLM(model=None, device="cpu", dtype="float32", **options)``.

    ``model=None`` is the bundled tiny model. ``options`` are those of
    ``build_engine_config`` (below): seed, block_size, kv_blocks, host_kv_blocks,
    host_kv_gib, swap_watermark, swap_int8, enable_prefix_caching, max_num_seqs,
    max_num_batched_tokens, enable_chunked_prefill, policy, preemption_mode,
    max_model_len, cost_model, mlfq_q0, starvation_limit, async_scheduling.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        **options: Any,
    ) -> None:
        self._init(build_engine_config(model=model, device=device, dtype=dtype, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._init(config)
        return llm

    def _init(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.engine = LLMEngine(config, tokenizer=self.tokenizer)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        prios = list(priorities) if priorities is not None else [0] * len(prompts)
        order: dict[str, int] = {}
        texts: dict[str, str | None] = {}
        try:
            for i, (prompt, p, prio) in enumerate(zip(prompts, params, prios, strict=True)):
                if isinstance(prompt, str):
                    ids = self.tokenizer(prompt).input_ids
                    text: str | None = prompt
                else:
                    ids, text = list(prompt), None
                req = self.engine.add_request(ids, p, priority=prio)
                order[req.request_id] = i
                texts[req.request_id] = text
            results: list[RequestOutput | None] = [None] * len(prompts)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        out.prompt = texts[out.request_id]
                        results[order[out.request_id]] = out
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(
                f"engine finished without results for prompts {missing[:10]} (a bug)"
            )
        return results  # type: ignore[return-value]


def build_engine_config(
    model: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    seed: int = 0,
    block_size: int = 16,
    kv_blocks: int | None = None,
    host_kv_blocks: int = 0,
    host_kv_gib: float | None = None,
    swap_watermark: float = 0.05,
    swap_int8: bool = False,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    enable_chunked_prefill: bool = True,
    policy: str = "mlfq",
    preemption_mode: str | None = None,
    max_model_len: int | None = None,
    cost_model: str | None = None,
    mlfq_q0: float | None = None,
    starvation_limit: float = 60.0,
    gpu_memory_utilization: float = 0.9,
    attention: str = "auto",
    cuda_graphs: bool = True,
    async_scheduling: bool | None = None,
) -> EngineConfig:
    """The engine configuration the offline API and the workers share (model=None: bundled).

    The host tier is sized by ``host_kv_blocks`` or by ``host_kv_gib`` (not both): GiB of
    host memory over the bytes of one host block (int8 blocks are smaller). ``model`` may
    be ``random:NAME`` (``tandem.random_model``). On CUDA without ``kv_blocks``, the device
    tier takes ``gpu_memory_utilization`` of the GPU's memory less the weights and a
    working reserve (measured now, so call this in the process that will use the GPU).
    ``async_scheduling``: None = on for CUDA, off for CPU (where nothing runs concurrently
    with the host, so overlapping only costs a step of latency).
    """
    if model is None:
        from tandem.tinymodel import default_model_dir

        model = default_model_dir()
    check_device(device)
    model = resolve_model(str(model), seed)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"gpu_memory_utilization (--gpu-memory-utilization) must be in (0, 1], got {gpu_memory_utilization}"
        )
    if kv_blocks is None:
        kv_blocks = (
            _auto_gpu_kv_blocks(model, dtype, block_size, device, gpu_memory_utilization)
            if device.startswith("cuda")
            else _auto_kv_blocks(model, dtype, block_size)
        )
    if host_kv_gib is not None:
        if host_kv_blocks:
            raise ValueError("give host_kv_blocks (--host-kv-blocks) or host_kv_gib, not both")
        if not host_kv_gib > 0:
            raise ValueError(f"host_kv_gib (--host-kv-gib) must be > 0, got {host_kv_gib}")
        host_kv_blocks = _host_kv_blocks(model, dtype, block_size, host_kv_gib, swap_int8)
    return EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        seed=seed,
        cache=CacheConfig(
            block_size=block_size,
            num_blocks=kv_blocks,
            num_host_blocks=host_kv_blocks,
            swap_int8=swap_int8,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            policy=policy,
            preemption_mode=preemption_mode or ("swap" if host_kv_blocks > 0 else "recompute"),
            max_model_len=max_model_len,
            swap_watermark=swap_watermark,
            mlfq_q0=mlfq_q0,
            starvation_limit=starvation_limit,
        ),
        cost_model_path=cost_model,
        attention=attention,
        cuda_graphs=cuda_graphs,
        async_scheduling=device.startswith("cuda")
        if async_scheduling is None
        else async_scheduling,
    )


def _auto_kv_blocks(model: str, dtype: str, block_size: int) -> int:
    per_block = kv_block_bytes(ModelConfig.from_pretrained(model), dtype, block_size)
    return max(16, DEFAULT_CPU_KV_BYTES // per_block)


def check_device(device: str) -> None:
    """A clear error (naming --device) for a CUDA device this machine does not have."""
    if not device.startswith("cuda"):
        return
    import torch

    index = device.partition(":")[2]
    if index and not index.isdigit():
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        why = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(
            f"--device {device}: this machine has 0 CUDA device(s) (torch {torch.__version__} {why})"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


# Activations, logits, sampler scratch, CUDA graph pools and allocator slack.
GPU_WORKING_RESERVE_BYTES = 3 * 2**30


def _auto_gpu_kv_blocks(
    model: str, dtype: str, block_size: int, device: str, utilization: float
) -> int:
    import torch

    cfg = ModelConfig.from_pretrained(model)
    free, total = torch.cuda.mem_get_info(torch.device(device))
    weights = cfg.num_params() * (4 if dtype == "float32" else 2)
    budget = min(free, total * utilization) - weights - GPU_WORKING_RESERVE_BYTES
    blocks = int(budget // kv_block_bytes(cfg, dtype, block_size))
    if blocks < 16:
        raise ValueError(
            f"not enough GPU memory on {device} for the KV cache: {free / 2**30:.1f} GiB free, "
            f"weights {weights / 2**30:.1f} GiB; lower --max-num-seqs or raise --gpu-memory-utilization"
        )
    return blocks


def _host_kv_blocks(model: str, dtype: str, block_size: int, gib: float, int8: bool) -> int:
    per_block = kv_block_bytes(ModelConfig.from_pretrained(model), dtype, block_size, int8)
    blocks = int(gib * 2**30) // per_block
    if blocks < 1:
        raise ValueError(
            f"host_kv_gib (--host-kv-gib) {gib} holds no KV block ({per_block} bytes each)"
        )
    return blocks
