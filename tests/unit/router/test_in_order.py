"""InOrder: a request's token items back in output order (pure)."""

from __future__ import annotations

from router.workers import InOrder
from tandem.protocol import ErrorKind, TokenItem


def item(tokens, offset, reason=None, error=None):
    return TokenItem("r", tokens, reason, error, None, offset)


def test_swapped_items_are_released_in_order():
    o = InOrder()
    assert o.push(item([5, 6], 1)) == []  # the first token is still on the other socket
    ready = o.push(item([4], 0))
    assert [i.new_token_ids for i in ready] == [[4], [5, 6]]
    ready = o.push(item([7], 3, reason="length"))
    assert [i.new_token_ids for i in ready] == [[7]] and ready[0].finish_reason == "length"


def test_errors_pass_at_once_and_restart_counts_from_delivered():
    o = InOrder()
    o.push(item([1, 2], 0))
    lost = TokenItem.failed("r", ErrorKind.WORKER_LOST, "worker-lost: x")
    assert o.push(lost) == [lost]
    o.restart(2)  # a re-run: its offsets start at 0 again after 2 delivered tokens
    assert [i.new_token_ids for i in o.push(item([3], 0))] == [[3]]
    assert o.next == 3


def test_overlap_is_dropped():
    o = InOrder()
    o.push(item([1, 2, 3], 0))
    ready = o.push(item([3, 4], 2))
    assert [i.new_token_ids for i in ready] == [[4]]
