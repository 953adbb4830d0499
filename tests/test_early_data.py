"""The device against a server that sends DATA before CONNECT (the Java server
does, PROTOCOL.md), or DATA for ids with no CONNECT at all, or never reads.

The server is a raw socket spoken frame by frame (support.peers.RawPeer),
so every byte the device sends is checked as it appears on the wire.
"""

import socket
import threading
import time

import pytest

from support.agents import run_tcprc
from support.net import recv_exactly
from support.peers import RawPeer
from support.services import Service, pattern
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.wire import session as device
from tcprc.wire.frames import CLOSE, CONNECT, DATA


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
def test_data_before_connect_reaches_the_service_in_order(tcprc_device_on, service):
    app, peer = tcprc_device_on()
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


def test_data_before_a_connect_that_names_the_target_by_another_name(tcprc_device_on, service):
    # The Java server given `localhost:PORT` for a device whose local is
    # 127.0.0.1:PORT: the CONNECT is checked by name lookup in the pump
    # thread, and the held DATA must still reach the service first.
    app, peer = tcprc_device_on()
    peer.send(DATA, 6, b"hello ")
    peer.send(CONNECT, 6, protocol.encode_connect_payload("localhost", service.address[1]))
    peer.send(DATA, 6, b"world")
    assert _read_data(peer, 6, 11) == b"hello world"
    assert service.accepted == 1


def test_speaks_first_client_gets_its_answer(tcprc_device_on, service):
    # The SSH-like case: the client's banner is DATA ahead of the CONNECT; the
    # echo service answers it like a server would.
    app, peer = tcprc_device_on()
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


def test_data_without_connect_gets_one_close_after_the_wait(tcprc_device_on, service, short_wait):
    app, peer = tcprc_device_on()
    peer.send_raw(b"".join(protocol.encode(DATA, 9, b"lost%d" % i) for i in range(3)))
    peer.nothing_for(short_wait / 2)                  # held, not answered at once
    assert peer.read_frame() == (CLOSE, 9, b"")
    peer.send(DATA, 9, b"more")                       # late: already answered
    peer.nothing_for(short_wait * 3)
    assert service.accepted == 0


def test_connect_after_our_close_is_stale_until_the_servers_close(tcprc_device_on, service, short_wait):
    app, peer = tcprc_device_on()
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


def test_late_data_for_an_id_closed_here_gets_no_second_close(tcprc_device_on, service, short_wait):
    app, peer = tcprc_device_on()
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


def test_servers_close_drops_held_data(tcprc_device_on, service, short_wait):
    app, peer = tcprc_device_on()
    peer.send(DATA, 7, b"gone")
    peer.send(CLOSE, 7)                               # the client left before its CONNECT
    peer.nothing_for(short_wait * 3)                  # nothing to answer
    _connect(peer, 7)
    peer.send(DATA, 7, b"new")
    assert peer.read_frame() == (DATA, 7, b"new")     # the dropped bytes do not reappear


def test_early_data_over_its_bounds_is_refused_at_once(tcprc_device_on, service, monkeypatch):
    monkeypatch.setattr(device, "EARLY_WAIT", 60.0, raising=False)   # any CLOSE now comes from a bound
    app, peer = tcprc_device_on()
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


# ---- item: a server that never reads and sends DATA for unknown ids ----------------------
def _rss_kb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def _unread(local, remote):
    """(send queue, receive queue) bytes of the TCP socket `local` -> `remote`."""
    want = "%08X:%04X %08X:%04X" % (0x0100007F, local[1], 0x0100007F, remote[1])
    with open("/proc/net/tcp") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and " ".join(fields[1:3]) == want:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    raise AssertionError("no socket %s:%d -> %s:%d" % (local + remote))


# Two ways to make a device answer frames: DATA for ids with no CONNECT, and
# CONNECTs it must refuse (malformed: a one-byte payload); and megabytes of
# them.  Each refused CONNECT whose CLOSE left is answered again, one small
# send each until the socket buffers fill: the second attack costs more CPU.
ATTACKS = {
    "unknown-data": (lambda n: protocol.encode(DATA, n, b"x"), 20),
    "refused-connect": (lambda n: protocol.encode(CONNECT, n, b"\x00"), 8),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_server_that_never_reads_cannot_grow_device_memory(agents, legacy_server, attack):
    svc = Service("echo")
    try:
        proc = agents.start("device", "--server", legacy_server.address,
                            "--local", "%s:%d" % svc.address,
                            config="[device]\nreconnect_min = 0.05\nreconnect_max = 0.2\n")
        peer = legacy_server.accept()
        peer.expect(bytes.fromhex("00000400"))
        # Warm up: one stream there and back, and one hold-and-refuse.
        _connect(peer, 1)
        peer.send(DATA, 1, b"w")
        assert peer.read_frame() == (DATA, 1, b"w")
        peer.send(CLOSE, 1)
        wait_for(lambda: svc.ended == 1, what="the warm-up stream to close")
        peer.send(DATA, 2, b"z")
        assert peer.read_frame() == (CLOSE, 2, b"")
        base = _rss_kb(proc.pid)
        # From here on the server reads nothing: megabytes of 5-byte frames.
        frame, megabytes = ATTACKS[attack]
        chunk = b"".join(frame(n) for n in range(3, 256)) * 800
        peer.sock.settimeout(120)
        peak = base
        for _ in range(megabytes):
            peer.sock.sendall(chunk)
            peak = max(peak, _rss_kb(proc.pid))
            assert peak - base < 100 * 1024, "device RSS %d KB -> %d KB" % (base, peak)
        device_end, server_end = peer.sock.getpeername(), peer.sock.getsockname()
        # Read all of it: nothing left in our send queue nor in its receive queue.
        wait_for(lambda: _unread(server_end, device_end)[0] == 0
                 and _unread(device_end, server_end)[1] == 0,
                 timeout=120, what="the device to read all of it")
        after = _rss_kb(proc.pid)
        print("device RSS: idle %d KB, peak %d KB, after %d KB" % (base, peak, after))
        assert max(peak, after) - base < 8 * 1024, (base, peak, after)
        # Still working: the control socket answers, and with the hostile server
        # gone it dials again and carries a stream.
        status = run_tcprc("ctl", "--role", "device", "-c",
                           proc.control_socket.replace(".sock", ".toml"), "status")
        assert status.returncode == 0 and "state: up" in status.stdout, status
        peer.close()
        again = legacy_server.accept()
        again.expect(bytes.fromhex("00000400"))
        _connect(again, 1)
        again.send(DATA, 1, b"alive")
        assert again.read_frame() == (DATA, 1, b"alive")
        assert proc.poll() is None
    finally:
        svc.close()


def _stays(condition, seconds):
    """`condition` holds all along a window of `seconds` (a check of absence)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition()
        time.sleep(0.02)
    return True


def test_link_stops_reading_while_its_control_frames_pile_up(service):
    from tcprc.device.link import open_device_link
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # inherited by accept
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    uplink = socket.create_connection(listener.getsockname())
    uplink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer = RawPeer(listener.accept()[0])
    listener.close()
    link = open_device_link(uplink, settings("device", local="%s:%d" % service.address),
                            "test uplink", service.address, set())
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    try:
        peer.expect(bytes.fromhex("00000400"))
        # 200 KB of control frames the peer does not read (the link thread's
        # own way to send; CONNECT because CLOSEs for one id coalesce).
        piled = threading.Event()

        def pile():
            for n in range(200):
                link.post(CONNECT, n % 256, bytes(1000))
            piled.set()
        link.loop.call_soon(pile)
        wait_for(piled.is_set, what="the frames to be queued")
        _connect(peer, 1)
        peer.send(DATA, 1, b"ping")
        _stays(lambda: service.accepted == 0, 0.5)     # not read while they pile up
        for n in range(200):                            # the peer reads: they drain...
            assert peer.read_frame() == (CONNECT, n % 256, bytes(1000))
        assert peer.read_frame() == (DATA, 1, b"ping")  # ...and the link reads again
        assert service.accepted == 1
    finally:
        link.stop("test over")
        assert link.wait_stopped(10)
        peer.close()


def test_writer_keeps_one_unsent_close_per_id():
    from tcprc.engine.writer import FrameWriter
    near, far = socket.socketpair()
    try:
        writer = FrameWriter(near)

        def post(command, client_id, payload=b""):   # as the link posts a control frame
            return writer.post(protocol.encode(command, client_id, payload),
                               protocol.coalesce_key(command, client_id))
        assert [post(CLOSE, 5) for _ in range(3)] == [True, False, False]
        assert post(CLOSE, 6) and post(CONNECT, 5, b"\0\0\0\0")
        assert writer.queued_bytes() == 4 + 4 + 8
        assert writer.flush_nowait() == FrameWriter.DONE and writer.queued_bytes() == 0
        assert post(CLOSE, 5)                   # the first one left: news again
        writer.flush_nowait()
        far.settimeout(5)
        assert recv_exactly(far, 20) == bytes.fromhex("00000205 00000206 000401050000000000000205")
    finally:
        near.close()
        far.close()
