"""The protocol's rules, proved by a device core and a server core against each other
in memory (tests/support/core.py): no socket, no thread, time turned by hand.

Scenario tests first, one rule each; then properties over random interleavings
of writes, reads, half-closes and resets, with frames delivered one at a time in
any order the two directions allow (seeded, so a failure names its seed and
replays).
"""

import random

import pytest

from support.core import Pair
from tcprc.wire import frames
from tcprc.wire.streams import GROWTH, GROWTH_BUDGET_WINDOWS

WINDOW = 64 * 1024


def _v2():
    pair = Pair(v2=True, window=WINDOW)
    assert pair.device.upgraded and pair.server.session.state.value == "v2"
    return pair


# ---- one rule each ---------------------------------------------------------------------------

def test_a_sender_never_has_more_than_the_window_in_flight():
    pair = _v2()
    cid = pair.connect()
    pair.server.write(cid, bytes(10 * WINDOW))
    pair.flush()                                   # the device's application reads nothing
    stream = pair.device.streams[cid]
    assert len(stream.inbox) == WINDOW and pair.server.streams[cid].credit == 0
    assert not pair.device.errors and not pair.server.errors
    pair.device.read(cid)                          # reading returns credit: more comes
    pair.flush()
    assert len(stream.read) + len(stream.inbox) > WINDOW


def test_a_stream_that_keeps_up_grows_its_window_within_the_uplinks_budget():
    pair = _v2()
    streams = [pair.connect() for _ in range(80)]
    for _ in range(40):
        for cid in streams:
            pair.server.write(cid, bytes(WINDOW))
        pair.flush()
        for cid in streams:
            pair.device.read(cid)
        pair.flush()
        windows = [pair.device.streams[cid].rules.window for cid in streams]
        assert all(w <= GROWTH * WINDOW for w in windows)
        assert pair.device.session.grown() <= GROWTH_BUDGET_WINDOWS * WINDOW
    assert pair.device.session.grown() == GROWTH_BUDGET_WINDOWS * WINDOW   # the bound was reached
    for cid in streams:
        pair.device.reset(cid)
    pair.flush()
    assert pair.device.session.grown() == 0       # released streams give their growth back


def test_a_half_close_each_way_keeps_the_other_direction_then_closes_once_answered():
    pair = _v2()
    cid = pair.connect()
    pair.device.write(cid, b"request")
    pair.device.shut(cid)                         # the device's side is done sending
    pair.flush()
    assert pair.server.read(cid) == b"request" and pair.server.streams[cid].got_eof
    assert cid in pair.server.streams and cid in pair.device.streams
    pair.server.write(cid, b"the answer")         # the other way goes on
    pair.flush()
    assert pair.device.read(cid) == b"the answer"
    pair.server.shut(cid)
    pair.flush()
    pair.device.read(cid)
    pair.flush()
    assert cid not in pair.server.streams and cid not in pair.device.streams
    closes = [s for s in pair.device.gone.values()] + [s for s in pair.server.gone.values()]
    assert all(s.closed and s.released for s in closes)
    # One CLOSE each way: the one that closed, and its answer; the id is free again.
    assert pair.closes == {("device", cid): 1, ("server", cid): 1}
    assert not pair.server.session.ids.is_held(cid)


def test_a_reset_reaches_the_other_end_as_a_reset_with_its_reason():
    pair = _v2()
    cid = pair.connect()
    pair.device.reset(cid)
    pair.flush()
    assert pair.server.gone[cid].reset and cid not in pair.server.streams
    assert not pair.server.session.ids.is_held(cid)


def test_data_past_the_window_or_after_eof_ends_that_stream_with_an_error():
    pair = _v2()
    cid = pair.connect()
    pair.server.out.append((frames.DATA, cid, bytes(WINDOW)))
    pair.server.out.append((frames.DATA, cid, b"one too many"))
    pair.flush()
    assert pair.device.errors == ["the peer sent 12 bytes past its window"]
    assert cid not in pair.device.streams and cid not in pair.server.streams
    other = pair.connect()
    pair.server.out.append((frames.EOF, other, b""))
    pair.server.out.append((frames.DATA, other, b"late"))
    pair.flush()
    assert pair.device.errors[-1] == "the peer sent DATA after its EOF"


def test_credit_past_the_largest_ends_the_stream():
    pair = _v2()
    cid = pair.connect()
    for _ in range(2):
        pair.device.out.append((frames.CREDIT, cid, frames.encode_credit(frames.MAX_CREDIT)))
    pair.flush()
    assert cid not in pair.server.streams and cid not in pair.device.streams


def test_heartbeats_ping_and_a_silent_peer_is_given_up():
    pair = _v2()
    device = pair.device
    device.now = 1.0
    device.tick()
    assert [f[0] for f in device.out] == [frames.PING]
    pair.server.now = 1.0
    pair.flush()                                   # PONG back: an RTT sample
    assert device.session.rtt is not None and not device.failed
    device.now = 1.0 + 3.0                         # 3 s of silence: the timeout
    device.tick()
    assert device.failed == "no frame from the peer for 3 s: heartbeat timeout"


def test_a_legacy_pair_carries_a_stream_and_closes_it_with_one_close():
    pair = Pair(v2=False)
    cid = pair.connect()
    pair.device.write(cid, b"x" * 100000)
    pair.flush()
    assert pair.server.read(cid) == b"x" * 100000
    pair.device.shut(cid)                          # legacy: the end is a CLOSE
    pair.flush()
    assert cid not in pair.server.streams and cid not in pair.device.streams


# ---- properties over random interleavings ----------------------------------------------------------

OPS = ("write", "read", "shut", "reset", "step", "flush")
EXAMPLES = 150


def random_ops(seed):
    """Up to 60 (op, side, stream, size) steps; sizes lean on the window's edges."""
    rng = random.Random(seed)
    sizes = (1, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW)
    return [(rng.choice(OPS), rng.choice(("device", "server")), rng.randrange(4),
             rng.choice(sizes) if rng.random() < 0.3 else rng.randint(1, 3 * WINDOW))
            for _ in range(rng.randint(0, 60))]


@pytest.mark.parametrize("seed", range(EXAMPLES))
def test_a_conforming_pair_keeps_its_rules_and_every_byte_in_any_interleaving(seed):
    ops = random_ops(seed)
    pair = _v2()
    ids = [pair.connect() for _ in range(4)]
    reset = set()
    for op, who, which, size in ops:
        side = pair.device if who == "device" else pair.server
        cid = ids[which]
        if op == "step":
            pair.step(side)
        elif op == "flush":
            pair.flush()
        elif cid not in side.streams:
            continue
        elif op == "write" and not side.streams[cid].want_eof:
            side.write(cid, bytes([which]) * size)
        elif op == "read":
            side.read(cid, size)
        elif op == "shut":
            side.shut(cid)
        elif op == "reset":
            reset.add(cid)
            side.reset(cid)
        # At every moment: nobody broke a rule, growth stays bounded.
        assert not pair.device.errors and not pair.server.errors
        assert not pair.device.failed and not pair.server.failed
        for s in pair.sides():
            assert s.session.grown() <= GROWTH_BUDGET_WINDOWS * WINDOW
    # Then both applications read everything (a closed stream's last bytes too: the
    # engine drains them to the socket), and both shut their sides.
    for _ in range(200):
        pair.flush()
        for side in pair.sides():
            for cid in list(side.gone):
                side.read(cid)
            for cid in list(side.streams):
                side.read(cid)
                if cid in side.streams:   # reading the peer's EOF may have finished it
                    side.shut(cid)
        if not pair.device.streams and not pair.server.streams and \
                not pair.device.out and not pair.server.out:
            break
    assert not pair.device.streams and not pair.server.streams, "a stream never closed"
    for cid in ids:
        if cid in reset:
            continue
        for frm, to in ((pair.device, pair.server), (pair.server, pair.device)):
            sent, got = frm.gone[cid].written, to.gone[cid].read
            assert got == sent, "bytes lost, reordered or invented"
        assert not pair.server.session.ids.is_held(cid)
    for cid in ids:   # every CLOSE answered, none sent twice
        assert pair.closes.get(("device", cid)) == pair.closes.get(("server", cid)) == 1
