"""Triton kernels against their torch references.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
numpy on the CPU), so CI checks their indexing, masking and softmax logic; tests/gpu runs
the same comparisons compiled, in bf16 too. Skipped when Triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated (import)
pytest.importorskip("triton")


def _interpreter_numpy2_fix() -> None:
    """Triton 3.6's interpreter turns a scalar into an index with ``int(array)``, which
    numpy >= 2.4 refuses for shape-(1,) arrays (loaded scalars); take the one element."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "tandem_fixed", False):
        return  # another Triton version: nothing to patch (or already patched)

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    patched.tandem_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy2_fix()

from tandem.attention.base import AttentionMetadata  # noqa: E402
from tandem.attention.torch_ref import TorchReferenceBackend  # noqa: E402
from tandem.attention.triton_backend import TritonPagedBackend  # noqa: E402
from tandem.config import RopeConfig  # noqa: E402
from tandem.kernels import elementwise as ew  # noqa: E402
from tandem.models.layers import RMSNorm, apply_rotary, rope_inv_freq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _slack(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view at the front of a larger zeroed buffer. The kernels pad head_dim and
    head groups to powers of two with masked loads; compiled, a masked lane is never read,
    but Triton 3.6's interpreter hands back garbage for masked lanes whose address lies past
    the end of the tensor's storage, and a dot then spreads it (seen as a NaN head after
    freed NaN memory). Zeroed memory behind the tensor keeps the CPU check exact."""
    buf = torch.zeros(x.numel() + 4096, dtype=x.dtype, device=x.device)
    view = buf[: x.numel()].view(x.shape)
    view.copy_(x)
    return view


def _batch(q_lens, ctx_lens, page, num_blocks, gen):
    """Block tables with shuffled block ids, slots of the new tokens, metadata."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, qsl = [], [], [0]
    for n, ctx in zip(q_lens, ctx_lens, strict=True):
        nb = -(-ctx // page)
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        slots += [table[p // page] * page + p % page for p in range(ctx - n, ctx)]
        qsl.append(qsl[-1] + n)
    width = max(len(t) for t in tables)
    bt = torch.zeros((len(tables), width), dtype=torch.long)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    return AttentionMetadata(
        query_start_loc=qsl,
        seq_lens=list(ctx_lens),
        block_tables=bt.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEVICE),
        block_size=page,
    )


@pytest.mark.parametrize(
    "q_lens,ctx_lens,heads,window,d",
    [
        ([1, 1, 1], [5, 70, 130], (4, 2), None, 16),  # decodes, several splits
        ([37, 1, 20], [37, 300, 90], (4, 1), None, 16),  # prefill, decode, chunk over a prefix
        ([70, 1], [150, 47], (2, 2), 24, 16),  # sliding window, prefill and decode
        ([9, 1], [40, 90], (4, 2), None, 24),  # head_dim not a power of two (padded)
    ],
)
def test_paged_attention_matches_reference(q_lens, ctx_lens, heads, window, d):
    gen = torch.Generator().manual_seed(0)
    hq, hkv = heads
    page, num_blocks = 16, 64
    T = sum(q_lens)
    q = _slack(torch.randn(T, hq, d, generator=gen).to(DEVICE))
    k = _slack(torch.randn(T, hkv, d, generator=gen).to(DEVICE))
    v = _slack(torch.randn(T, hkv, d, generator=gen).to(DEVICE))
    cache = torch.randn(2, num_blocks, page, hkv, d, generator=gen).to(DEVICE)
    meta = _batch(q_lens, ctx_lens, page, num_blocks, gen)
    meta.sliding_window = window
    kc_ref, vc_ref = cache[0].clone(), cache[1].clone()
    ref = TorchReferenceBackend().forward(q, k, v, kc_ref, vc_ref, meta, d**-0.5)
    kc, vc = _slack(cache[0]), _slack(cache[1])
    meta_t = _batch(q_lens, ctx_lens, page, num_blocks, torch.Generator().manual_seed(0))
    meta_t.block_tables, meta_t.slot_mapping = meta.block_tables, meta.slot_mapping
    meta_t.sliding_window = window
    out = TritonPagedBackend().forward(q, k, v, kc, vc, meta_t, d**-0.5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("partition,splits", [(64, 4), (4, 64)])  # 64: the reduce loops
def test_decode_with_forced_splits_and_padding_rows(partition, splits):
    """A graph-style batch: fixed partition and split count, a padding row (seq_len 0,
    slot -1) that must write zeros and store nothing."""
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d, page, num_blocks = 8, 2, 16, 16, 32
    meta = _batch([1, 1], [100, 33], page, num_blocks, gen)
    q = _slack(torch.randn(3, hq, d, generator=gen).to(DEVICE))
    k = _slack(torch.randn(3, hkv, d, generator=gen).to(DEVICE))
    v = _slack(torch.randn(3, hkv, d, generator=gen).to(DEVICE))
    cache = torch.randn(2, num_blocks, page, hkv, d, generator=gen).to(DEVICE)
    ref = TorchReferenceBackend().forward(
        q[:2], k[:2], v[:2], cache[0].clone(), cache[1].clone(), meta, 0.25
    )
    from tandem.attention.base import DeviceMeta

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    width = meta.block_tables.shape[1]
    meta.block_tables = torch.cat(
        [meta.block_tables, torch.zeros(1, width, dtype=torch.long, device=DEVICE)]
    )
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.tensor([-1], device=DEVICE)])
    meta.query_start_loc, meta.seq_lens = [0, 1, 2, 3], [100, 33, 0]
    meta.device = DeviceMeta(
        seq_lens=i32([100, 33, 0]), query_start=i32([0, 1, 2, 3]), decode_idx=i32([0, 1, 2]),
        prefill_idx=i32([]), max_query_len=1, max_seq_len=256, decode_partition=partition,
        decode_splits=splits,
    )  # fmt: skip
    kc, vc = _slack(cache[0]), _slack(cache[1])
    out = TritonPagedBackend().forward(q, k, v, kc, vc, meta, 0.25)
    torch.testing.assert_close(out[:2], ref, atol=2e-5, rtol=2e-5)
    assert torch.count_nonzero(out[2]) == 0
    touched = (kc != cache[0]).any(dim=(-1, -2)).flatten().nonzero().flatten().tolist()
    assert sorted(touched) == sorted(meta.slot_mapping[:2].tolist())


def test_rms_norm_with_and_without_residual():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 48, generator=gen).to(DEVICE)
    r = torch.randn(5, 48, generator=gen).to(DEVICE)
    norm = RMSNorm(48, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    out, res = ew.rms_norm(x, norm.weight, 1e-5)
    assert res is None
    torch.testing.assert_close(out, norm(x))
    out, res = ew.rms_norm(x, norm.weight, 1e-5, residual=r)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, norm(x + r))


def test_rotary_in_place_matches_reference():
    gen = torch.Generator().manual_seed(3)
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)
    inv = rope_inv_freq(48, rope).to(DEVICE)  # half = 24: not a power of two
    pos = torch.tensor([0, 5, 17, 1000], device=DEVICE)
    q = torch.randn(4, 6, 48, generator=gen).to(DEVICE)
    k = torch.randn(4, 2, 48, generator=gen).to(DEVICE)
    freqs = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    ew.rotary_(q, k, pos, inv)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref = torch.nn.functional.silu(x[:, :40]) * x[:, 40:]
    torch.testing.assert_close(ew.silu_and_mul(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim,window", [(16, None), (24, 7)])
def test_warm_up_runs_every_variant_without_touching_the_cache(head_dim, window):
    """The start-up compile pass: every path runs (slots -1 store nothing)."""
    TritonPagedBackend().warm_up(8, 2, head_dim, 16, torch.float32, torch.device(DEVICE), window)


def test_rotary_store_kv_matches_rotary_then_store():
    """The fused kernel: q rotated in place, rotated k and v stored at their slots (slot -1
    stores nothing), k itself untouched; equal to ``rotary_`` followed by ``store_kv``."""
    gen = torch.Generator().manual_seed(5)
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0)
    d, hq, hkv, page, blocks = 48, 6, 2, 4, 8
    inv = rope_inv_freq(d, rope).to(DEVICE)
    for pos_dtype in (torch.long, torch.int32):
        pos = torch.tensor([0, 5, 17, 1000], device=DEVICE, dtype=pos_dtype)
        slots = torch.tensor([3, -1, 30, 8], device=DEVICE, dtype=pos_dtype)
        # q, k, v as views of one fused projection output (row stride > row width)
        qkv = torch.randn(4, (hq + 2 * hkv) * d, generator=gen).to(DEVICE)
        q, k, v = (t.view(4, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
        cache = torch.randn(2, blocks, page, hkv, d, generator=gen).to(DEVICE)
        q_ref, k_ref = q.clone(), k.clone()
        kc_ref, vc_ref = cache[0].clone(), cache[1].clone()
        ew.rotary_(q_ref, k_ref, pos, inv)
        ew.store_kv(k_ref, v, kc_ref, vc_ref, slots)
        k_before = k.clone()
        kc, vc = _slack(cache[0]), _slack(cache[1])
        ew.rotary_store_kv(q, k, v, kc, vc, slots, pos, inv)
        torch.testing.assert_close(q, q_ref, atol=0, rtol=0)
        assert torch.equal(k, k_before)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        stored = (kc != cache[0]).any(dim=(-1, -2)).flatten().nonzero().flatten().tolist()
        assert stored == [3, 8, 30]
