"""The host KV tier's bytes (block-major, optional int8) and the swapper, on CPU."""

from __future__ import annotations

import pytest
import torch

from tandem.config import ModelConfig, kv_block_bytes
from tandem.runner.host_kv import HostKVTier, contiguous_runs, dequantize_int8, quantize_int8
from tandem.runner.kv_swap import KVSwapper
from tandem.runner.kv_tensors import KVTensors
from tandem.sched.output import BlockCopy, SchedulerOutput

MODEL = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
)
BS = 4


def test_contiguous_runs():
    assert contiguous_runs([]) == []
    assert contiguous_runs([3, 4, 5, 9, 2, 3]) == [(0, 3, 3), (3, 9, 1), (4, 2, 2)]
    assert contiguous_runs([5, 4]) == [(0, 5, 1), (1, 4, 1)]


def test_int8_error_is_at_most_half_a_step_per_head_and_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 2, 2, BS, 2, 8), generator=g) * torch.tensor([1.0, 50.0])[:, None]
    x[1] = 0.0  # an all-zero block must survive (no division by zero)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 2, 2, 2)
    err = (dequantize_int8(q, scale, torch.float32) - x).abs()
    bound = scale[:, :, :, None, :, None] / 2 + 1e-6
    assert bool((err <= bound).all())
    assert bool((dequantize_int8(q, scale, torch.float32)[1] == 0).all())


@pytest.mark.parametrize("int8", [False, True])
def test_host_tier_round_trip_through_scattered_blocks(int8):
    host = HostKVTier(MODEL, 10, BS, torch.float32, int8=int8)
    assert host.bytes_per_block == kv_block_bytes(MODEL, "float32", BS, int8=int8)
    g = torch.Generator().manual_seed(1)
    payload = torch.randn((4, *host.block_shape), generator=g)
    ids = [7, 8, 2, 5]
    host.store(ids, payload)
    back = host.load([7, 8, 2, 5], torch.device("cpu"))
    if int8:
        assert not torch.equal(back, payload)
        torch.testing.assert_close(back, payload, atol=payload.abs().max().item() / 127, rtol=0)
    else:
        assert torch.equal(back, payload)
    assert torch.equal(host.load([2], torch.device("cpu")), back[2:3])
    with pytest.raises(ValueError):
        host.store([1, 2], payload)


def test_swapper_moves_blocks_out_and_back_and_counts_bytes():
    dev = KVTensors(MODEL, 8, BS, torch.float32, "cpu")
    dev.data.copy_(torch.randn(dev.data.shape, generator=torch.Generator().manual_seed(2)))
    before = dev.data[:, :, [1, 6]].clone()
    host = HostKVTier(MODEL, 16, BS, torch.float32)
    swapper = KVSwapper(dev, host)
    io = swapper.run(SchedulerOutput(offload=[BlockCopy("device", (1, 6), (9, 3))]))
    assert io.out_bytes == 2 * host.bytes_per_block and io.in_bytes == 0
    assert io.out_wait_s > 0 and io.in_wait_s == 0  # synchronous on CPU
    dev.data[:, :, [1, 6]] = 0.0
    io = swapper.run(SchedulerOutput(prefetch=[BlockCopy("host", (9, 3), (0, 4))]))
    assert io.in_bytes == 2 * host.bytes_per_block and io.in_wait_s > 0
    assert torch.equal(dev.data[:, :, [0, 4]], before)


def test_host_kv_gib_sizes_the_host_tier(tiny_llama_dir):
    from tandem.engine.llm import build_engine_config

    cfg = ModelConfig.from_pretrained(tiny_llama_dir)
    dense = build_engine_config(model=tiny_llama_dir, kv_blocks=16, host_kv_gib=0.01)
    per_block = kv_block_bytes(cfg, "float32", 16)
    assert dense.cache.num_host_blocks == int(0.01 * 2**30) // per_block
    assert dense.scheduler.preemption_mode == "swap"
    packed = build_engine_config(
        model=tiny_llama_dir, kv_blocks=16, host_kv_gib=0.01, swap_int8=True
    )
    assert packed.cache.num_host_blocks > 3 * dense.cache.num_host_blocks
    with pytest.raises(ValueError, match="not both"):
        build_engine_config(model=tiny_llama_dir, kv_blocks=16, host_kv_blocks=8, host_kv_gib=1)
