"""The device against a server that sends DATA before CONNECT (the Java server
does, PROTOCOL.md), or DATA for ids with no CONNECT at all, or never reads.

The server is a raw socket spoken frame by frame (test_legacy_interop.RawPeer),
so every byte the device sends is checked as it appears on the wire.
"""

import socket

import pytest

from conftest import Service, pattern, run_tcprc, wait_for
from test_legacy_interop import LegacyServer, RawPeer  # noqa: F401  (fixtures below use them)
from test_legacy_interop import device_on, legacy_server  # noqa: F401  (pytest fixtures)
from tcprc import device, protocol
from tcprc.protocol import CLOSE, CONNECT, DATA


def _connect(peer, client_id):
    peer.send(CONNECT, client_id, protocol.encode_connect_payload("", 0))   # the device's target


def _read_data(peer, client_id, size):
    """`size` bytes of DATA for `client_id`, with no other frame in between."""
    got = bytearray()
    while len(got) < size:
        frame = peer.read_frame()
        assert frame[:2] == (DATA, client_id), frame
        got += frame[2]
    return bytes(got)


@pytest.fixture
def short_wait(monkeypatch):
    # The hold is a tuning constant; a short one keeps "nothing comes after
    # the wait" checks quick.
    monkeypatch.setattr(device, "EARLY_WAIT", 0.3, raising=False)
    return 0.3


# ---- item: DATA before its CONNECT ------------------------------------------------------
def test_data_before_connect_reaches_the_service_in_order(device_on, service):
    app, peer = device_on()
    first = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
    bulk = pattern(60000)                              # several early frames, under the bound
    peer.send(DATA, 5, first)
    peer.send(DATA, 5, bulk[:30000])
    peer.send(DATA, 5, bulk[30000:])
    _connect(peer, 5)
    peer.send(DATA, 5, b"after")
    want = first + bulk + b"after"
    assert _read_data(peer, 5, len(want)) == want     # no CLOSE, every byte, in order
    assert service.accepted == 1
    assert app.status()["bytes_down"] == len(want)


def test_speaks_first_client_gets_its_answer(device_on, service):
    # The SSH-like case: the client's banner is DATA ahead of the CONNECT; the
    # echo service answers it like a server would.
    app, peer = device_on()
    for n in range(1, 21):
        peer.send(DATA, n, b"SSH-2.0-client-%d\r\n" % n)
        _connect(peer, n)
    answers = {}
    while len(answers) < 20 or any(len(v) < len(b"SSH-2.0-client-%d\r\n" % k)
                                   for k, v in answers.items()):
        command, client_id, payload = peer.read_frame()
        assert command == DATA, (command, client_id)
        answers[client_id] = answers.get(client_id, b"") + payload
    assert answers == {n: b"SSH-2.0-client-%d\r\n" % n for n in range(1, 21)}


def test_data_without_connect_gets_one_close_after_the_wait(device_on, service, short_wait):
    app, peer = device_on()
    peer.send_raw(b"".join(protocol.encode(DATA, 9, b"lost%d" % i) for i in range(3)))
    peer.nothing_for(short_wait / 2)                  # held, not answered at once
    assert peer.read_frame() == (CLOSE, 9, b"")
    peer.send(DATA, 9, b"more")                       # late: already answered
    peer.nothing_for(short_wait * 3)
    assert service.accepted == 0


def test_connect_after_our_close_is_stale_until_the_servers_close(device_on, service, short_wait):
    app, peer = device_on()
    peer.send(DATA, 9, b"early")
    assert peer.read_frame() == (CLOSE, 9, b"")
    _connect(peer, 9)                                 # was in flight: its client is gone
    peer.send(DATA, 9, b"x")
    peer.nothing_for(short_wait * 3)                  # no DATA, no second CLOSE
    assert service.accepted == 0
    peer.send(CLOSE, 9)                               # the Java server's answer to our CLOSE
    _connect(peer, 9)                                 # fresh now
    peer.send(DATA, 9, b"y")
    assert peer.read_frame() == (DATA, 9, b"y")
    assert service.accepted == 1


def test_late_data_for_an_id_closed_here_gets_no_second_close(device_on, service, short_wait):
    app, peer = device_on()
    _connect(peer, 4)
    peer.send(DATA, 4, b"a")
    assert peer.read_frame() == (DATA, 4, b"a")
    wait_for(lambda: service.open, what="the service connection")
    with service.lock:
        service.open[0].shutdown(socket.SHUT_RDWR)    # the service hangs up
    assert peer.read_frame() == (CLOSE, 4, b"")
    peer.send(DATA, 4, b"late")                       # crossed our CLOSE on the wire
    peer.nothing_for(short_wait * 3)
    # A CONNECT for it is a new client, and its early DATA is held again.
    peer.send(CLOSE, 4)
    peer.send(DATA, 4, b"b")
    _connect(peer, 4)
    assert peer.read_frame() == (DATA, 4, b"b")


def test_servers_close_drops_held_data(device_on, service, short_wait):
    app, peer = device_on()
    peer.send(DATA, 7, b"gone")
    peer.send(CLOSE, 7)                               # the client left before its CONNECT
    peer.nothing_for(short_wait * 3)                  # nothing to answer
    _connect(peer, 7)
    peer.send(DATA, 7, b"new")
    assert peer.read_frame() == (DATA, 7, b"new")     # the dropped bytes do not reappear


def test_early_data_over_its_bounds_is_refused_at_once(device_on, service, monkeypatch):
    monkeypatch.setattr(device, "EARLY_WAIT", 60.0, raising=False)   # any CLOSE now comes from a bound
    app, peer = device_on()
    # Per id: more than EARLY_PER_ID.
    peer.send(DATA, 3, pattern(65535))
    peer.send(DATA, 3, b"!!")
    assert peer.read_frame() == (CLOSE, 3, b"")
    peer.send(DATA, 3, b"?")
    # In all: four ids fit under EARLY_TOTAL, a fifth does not.
    share = 256 * 1024 // 4 - 100     # EARLY_TOTAL
    for n in (11, 12, 13, 14):
        peer.send(DATA, n, pattern(share, seed=n))
    peer.send(DATA, 15, pattern(1000))
    assert peer.read_frame() == (CLOSE, 15, b"")
    peer.nothing_for(0.3)                             # one CLOSE each, no more
    for n in (11, 12, 13, 14):                        # the held ones are intact
        _connect(peer, n)
        assert _read_data(peer, n, share) == pattern(share, seed=n)
    assert service.accepted == 4
