"""Prefix caching across a KV transfer, on every backend: the offer names the payload's
full blocks, a receiver that has cached the first ``k`` shares them and accepts with
``skip = k``, and only the rest of the payload moves."""

from __future__ import annotations

import pytest

from kvtransfer import BACKENDS, KVBundle
from kvtransfer.wire import Offer
from tandem.kvcache import BlockHasher
from tests.unit.kvtransfer.fakes import BLOCK, HASH, FakeEngineKV, make_bundle, pair, same_bits

pytestmark = pytest.mark.asyncio
backends = pytest.mark.parametrize("backend", sorted(BACKENDS))


class FakeCachedKV(FakeEngineKV):
    """Receiver callbacks with a prefix cache: ``warm(names)`` caches blocks under names."""

    def warm(self, names: list[bytes]) -> None:
        self.kv.allocate("warm", len(names) * BLOCK)
        self.kv.cache_blocks("warm", names, len(names) * BLOCK)
        self.kv.free("warm")  # cached, evictable

    def reserve_cached(self, request_id, num_tokens, block_names):
        self.calls.append(("reserve_cached", request_id))
        held = self.kv.match_prefix(block_names, num_tokens // BLOCK)
        return len(held), self.kv.reserve_import(request_id, num_tokens, held)

    async def commit(self, request_id, block_ids, payload, state):
        held = self.kv.pending_import_held(request_id)
        self.calls.append(("commit", request_id))
        table = self.kv.commit_import(request_id)
        assert table == held + block_ids
        self.committed[request_id] = (block_ids, payload.clone(), state)

    def assert_clean(self) -> None:
        audit = self.kv.audit()
        assert audit.ok and not self.kv.pending_imports(), audit


def _named(bundle: KVBundle) -> tuple[KVBundle, list[bytes]]:
    tokens = [*bundle.state["prompt_token_ids"], *bundle.state["output_token_ids"]]
    names = BlockHasher(BLOCK, "salt").hashes(tokens[: bundle.num_tokens])
    return KVBundle(bundle.request_id, bundle.num_tokens, bundle.payload, bundle.state,
                    tuple(names)), names  # fmt: skip


@backends
@pytest.mark.parametrize(("tokens", "cached"), [(10, 1), (10, 2), (12, 3), (10, 0)])
async def test_only_blocks_the_receiver_lacks_are_sent(backend, tokens, cached):
    fake = FakeCachedKV()
    bundle, names = _named(make_bundle("r", num_tokens=tokens, seed=3))
    fake.warm(names[:cached])
    async with pair(backend, fake) as (sender, receiver):
        await sender.send(receiver.address, bundle)
        block_ids, payload, state = fake.committed["r"]
        assert same_bits(payload, bundle.payload[:, :, cached:])
        assert len(block_ids) == bundle.payload.shape[2] - cached and state == bundle.state
        full = Offer.for_payload("r", tokens, bundle.payload, HASH, 0)
        sent = full.payload_nbytes * (full.num_blocks - cached) // full.num_blocks
        for m in (sender.metrics, receiver.metrics):
            assert m.skipped_blocks == cached and m.ok == 1
            assert sent <= m.bytes < sent + 2048  # the state is small
    assert fake.count("reserve_cached") == 1 and fake.count("reserve") == 0
    fake.assert_clean()
    # The shared blocks are referenced by the committed table (and by nothing else).
    assert all(fake.kv.pool.refcount(b) == 1 for b in fake.kv.block_table("r"))


@backends
async def test_a_receiver_without_a_cache_gets_everything(backend):
    fake = FakeEngineKV()  # no reserve_cached
    bundle, _ = _named(make_bundle("r", num_tokens=12, seed=1))
    async with pair(backend, fake) as (sender, receiver):
        await sender.send(receiver.address, bundle)
        assert same_bits(fake.committed["r"][1], bundle.payload)
        assert sender.metrics.skipped_blocks == 0
    fake.assert_clean()


async def test_a_refused_cached_reserve_releases_the_shared_blocks():
    fake = FakeCachedKV(num_blocks=4)
    bundle, names = _named(make_bundle("r", num_tokens=20, seed=2))  # 5 blocks > 4
    fake.warm(names[:2])
    async with pair("tcp", fake) as (sender, receiver):
        from kvtransfer import TransferRefused

        with pytest.raises(TransferRefused, match="no free blocks"):
            await sender.send(receiver.address, bundle)
    assert fake.kv.pool.num_used == 0 and fake.kv.match_prefix(names) != []
    fake.assert_clean()


def test_offer_skip_and_name_checks():
    bundle, names = _named(make_bundle("r", num_tokens=10))
    offer = Offer.for_payload("r", 10, bundle.payload, HASH, 5, names)
    assert offer.block_names == tuple(names) and len(names) == 2
    tail = offer.skip(2)
    assert (tail.num_blocks, tail.num_tokens, tail.shape[2]) == (1, 2, 1)
    assert tail.payload_nbytes == offer.payload_nbytes // 3 and tail.block_names == ()
    tail.check()
    assert offer.skip(0) is offer
    with pytest.raises(ValueError, match="cannot skip"):
        offer.skip(3)
    with pytest.raises(ValueError, match="only full blocks"):
        Offer.for_payload("r", 10, bundle.payload, HASH, 5, [*names, b"x" * 16])
    assert Offer.from_dict(offer.to_dict()) == offer
