"""Triton kernels compiled on CUDA: bf16/fp16 attention against the torch reference, and
CUDA-graph decode against eager decode on the same engine inputs."""

from __future__ import annotations

import pytest
import torch

from tandem.attention.torch_ref import TorchReferenceBackend
from tandem.attention.triton_backend import TritonPagedBackend
from tests.engine.test_triton_kernels import _batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "q_lens,ctx_lens",
    [([1] * 8, [17, 300, 1024, 4096, 5, 64, 65, 2000]), ([512, 1, 33], [700, 900, 33])],
)
def test_attention_low_precision_matches_reference(dtype, q_lens, ctx_lens):
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, page = 32, 8, 128, 16
    num_blocks = sum(-(-c // page) for c in ctx_lens) + 8
    T = sum(q_lens)
    q = torch.randn(T, hq, d, generator=gen).to("cuda", dtype)
    k = torch.randn(T, hkv, d, generator=gen).to("cuda", dtype)
    v = torch.randn(T, hkv, d, generator=gen).to("cuda", dtype)
    cache = torch.randn(2, num_blocks, page, hkv, d, generator=gen).to("cuda", dtype)
    meta = _batch(q_lens, ctx_lens, page, num_blocks, gen)
    ref = TorchReferenceBackend().forward(
        q.float(), k.float(), v.float(), cache[0].float(), cache[1].float(), meta, d**-0.5
    )
    meta.device = None
    out = TritonPagedBackend().forward(q, k, v, cache[0], cache[1], meta, d**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_graph_decode_equals_eager_decode(tiny_model_dirs):
    from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.request import SamplingParams
    from tests.engine.parity import mixed_prompts

    """Graphs on and off, async scheduling on and off: the same tokens. A third of the
    requests sample (seeded, with logprobs), which takes the graph path's sampler branch
    and writes its tokens into the staging row the next step reads on the device."""
    outs = []
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=5, logprobs=2, max_tokens=24, ignore_eos=True)
    for graphs, overlap in ((True, False), (False, False), (True, True), (False, True)):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_model_dirs["llama"]), device="cuda", dtype="float32",
                cache=CacheConfig(num_blocks=1024), scheduler=SchedulerConfig(max_num_seqs=32),
                cuda_graphs=graphs, async_scheduling=overlap,
            )
        )  # fmt: skip
        assert (engine.runner.graphs is not None) == graphs
        prompts = mixed_prompts(2048, n=24, seed=3)
        reqs = [engine.add_request(p, seeded if i % 3 == 0 else greedy)
                for i, p in enumerate(prompts)]  # fmt: skip
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.scheduler.device_kv.num_free_blocks == 1024
        outs.append([r.output_token_ids for r in reqs])
    for o in outs[1:]:
        assert o == outs[0]
