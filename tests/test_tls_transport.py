"""TlsTransport over real sockets: handshake failures that say which, the writer's
non-blocking path, buffered plaintext and the link, and bulk through two links."""

import hashlib
import os
import re
import socket
import threading

import pytest

from support.net import read_exactly, recv_exactly, tcp_pair
from support.services import Service, pattern
from support.tls import TlsTunnel, device_tls, handshake_pair, server_tls, shared_pki
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.engine.buffers import FrameBuffer
from tcprc.engine.loop import Loop
from tcprc.engine.tls import (TlsError, TlsTransport, device_context, looks_like_tls,
                              peer_identity, server_context)
from tcprc.engine.writer import FrameWriter
from tcprc.errors import ConfigError
from tcprc.wire import frames as protocol


@pytest.fixture(scope="module")
def pki():
    return shared_pki()


# ---- handshake failures: one line each, on each side -----------------------------------
CASES = {
    "unknown CA": (dict(ca="other"), dict(),
                   "the server's certificate: unknown CA",
                   "the device refused our certificate: unknown CA"),
    "wrong name": (dict(server_name="tunnel.example.org"), dict(),
                   "the server's certificate: wrong name: it is not valid for tunnel.example.org",
                   "the device refused our certificate: bad certificate"),
    "expired server certificate": (dict(server_name="old-server"), dict(name="old-server"),
                                   "the server's certificate: expired certificate",
                                   "the device refused our certificate: expired certificate"),
    "missing device certificate": (dict(), dict(client_ca="ca"),
                                   "the server refused our certificate: missing device certificate",
                                   "missing device certificate: the device presented none"),
    "device certificate of another CA": (
        dict(device=("other", "stranger")), dict(client_ca="ca"),
        "the server refused our certificate: unknown CA",
        "the device's certificate: unknown CA (not signed by tls_client_ca)"),
    "expired device certificate": (
        dict(device=("ca", "old-device")), dict(client_ca="ca"),
        "the server refused our certificate: expired certificate",
        "the device's certificate: expired certificate"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_handshake_failure_says_which_on_both_sides(pki, case):
    dkeys, skeys, device_says, server_says = CASES[case]
    device, server, errors = handshake_pair(device_tls(pki, **dkeys), server_tls(pki, **skeys),
                                            timeout=5)
    try:
        if errors[0] is None:
            # TLS 1.3: the device finishes first; the server's verdict is its first read.
            with pytest.raises(TlsError) as exc:
                device.recv_into(bytearray(64))
            errors[0] = exc.value
        assert isinstance(errors[0], TlsError) and device_says in str(errors[0])
        assert isinstance(errors[1], TlsError) and server_says in str(errors[1])
        assert "\n" not in str(errors[0]) + str(errors[1])
    finally:
        device.close()
        server.close()


def test_pin_mismatch_and_match(pki):
    device, server, errors = handshake_pair(
        device_tls(pki, fingerprint="sha256:" + "ab:" * 31 + "ab"), server_tls(pki))
    assert isinstance(errors[0], TlsError)
    assert "pin mismatch: the server's certificate is sha256:" in str(errors[0])
    assert "tls_fingerprint wants sha256:" + "ab" * 32 in str(errors[0])
    assert server.recv_into(bytearray(8)) == 0   # the device hung up
    for t in (device, server):
        t.close()
    # The right pin replaces the CA: no tls_ca, and a name the certificate does not carry.
    pin = pki.make("pin", pki.path("ca/localhost.crt")).strip()
    device, server, errors = handshake_pair(
        device_tls(pki, fingerprint=pin.upper().replace("SHA256", "sha256"),
                   server_name="not-in-the-cert"), server_tls(pki))
    try:
        assert errors == [None, None]
        server.sendall(b"pinned")
        assert read_exactly(device, 6) == b"pinned"
    finally:
        device.close()
        server.close()


def test_device_certificate_identity(pki):
    device, server, errors = handshake_pair(device_tls(pki, device=("ca", "dev-1")),
                                            server_tls(pki, client_ca="ca"))
    try:
        assert errors == [None, None]
        assert peer_identity(server) == "dev-1"
        assert peer_identity(device) == "localhost"   # the device sees the server's
    finally:
        device.close()
        server.close()


def test_a_plaintext_device_on_the_tls_port(pki):
    near, far = tcp_pair()
    server = TlsTransport(far, server_tls(pki))
    try:
        near.sendall(protocol.encode(protocol.LISTEN, 0))   # what a plain device sends first
        with pytest.raises(TlsError) as exc:
            server.handshake(5)
        assert str(exc.value) == "the device does not speak TLS (it sent a tcprc LISTEN frame)"
        near.sendall(b"\x00")
    finally:
        near.close()
        server.close()


def test_a_tls_device_on_a_plaintext_port(pki):
    """The plaintext server sees a ClientHello (looks_like_tls) and hangs up; the
    device says so.  A server that stays silent makes the handshake time out."""
    for silent in (False, True):
        near, far = tcp_pair()
        device = TlsTransport(near, device_tls(pki))
        seen = []

        def plaintext_server():
            seen.append(far.recv(4))
            if not silent:
                far.close()
        thread = threading.Thread(target=plaintext_server)
        thread.start()
        try:
            with pytest.raises(TlsError) as exc:
                device.handshake(0.5 if silent else 5)
            thread.join(10)
            assert looks_like_tls(seen[0]) and not looks_like_tls(protocol.encode(protocol.LISTEN, 0))
            if silent:
                assert "no TLS answer from the server within the handshake timeout" in str(exc.value)
            else:
                assert re.search("the server (closed|reset) the connection during the TLS handshake", str(exc.value))
        finally:
            device.close()
            far.close()


def test_config_problems_name_the_file(pki, tmp_path):
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="TLS certificate %s: cannot read it" % missing):
        server_context(missing, pki.path("ca/localhost.key"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem\n")
    with pytest.raises(ConfigError, match="TLS CA file %s: no PEM certificate" % junk):
        device_context("localhost", ca=str(junk))
    with pytest.raises(ConfigError, match="TLS certificate .*not a PEM certificate and its matching key"):
        server_context(pki.path("ca/localhost.crt"), pki.path("ca/dev-1.key"))
    with pytest.raises(ConfigError, match="tls_fingerprint"):
        device_context("localhost", fingerprint="sha256:1234")
    with pytest.raises(ConfigError, match="exclude each other"):
        device_context("localhost", ca=pki.path("ca/ca.crt"), fingerprint="sha256:" + "0" * 64)


def test_verification_is_on_and_tls_is_at_least_1_2(pki):
    import ssl
    device = device_context("localhost").context   # the system's CAs
    assert device.verify_mode == ssl.CERT_REQUIRED and device.check_hostname
    assert device.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context(pki.path("ca/localhost.crt"),
                          pki.path("ca/localhost.key")).context.minimum_version == ssl.TLSVersion.TLSv1_2


# ---- the engine's side ----------------------------------------------------------------
def test_control_frames_posted_while_the_uplink_is_full_arrive_whole_and_once(pki):
    """flush_nowait over a full socket: the ciphertext the socket refused is kept
    and the frame stays queued (FULL); once the peer reads, every frame arrives
    exactly once, in order, and a blocking sender's DATA comes after them."""
    near, far, errors = handshake_pair(device_tls(pki), server_tls(pki))
    assert errors == [None, None]
    try:
        near.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = FrameWriter(near)
        posted = []
        state = FrameWriter.DONE
        for n in range(100000):   # bounded: the socket fills long before
            payload = (b"%06d" % n) * 100
            writer.post(protocol.encode(protocol.CONNECT, n % 256, payload))
            posted.append((protocol.CONNECT, n % 256, payload))
            state = writer.flush_nowait()
            if state == FrameWriter.FULL:
                break
        assert state == FrameWriter.FULL
        assert near._staged == protocol.encode(*posted[-1])   # its records wait, it stays queued
        for n in range(3):   # more frames queue behind it
            writer.post(protocol.encode(protocol.CLOSE, n), protocol.coalesce_key(protocol.CLOSE, n))
            posted.append((protocol.CLOSE, n, b""))
        got = []
        decoder = FrameBuffer()
        bulk = os.urandom(200000)

        def reader():
            while len(got) < len(posted) + 4:
                if not decoder.receive(far):
                    return
                got.extend((c, i, bytes(p)) for c, i, p in decoder.frames())
        thread = threading.Thread(target=reader)
        thread.start()
        wait_for(lambda: writer.flush_nowait() == FrameWriter.DONE, what="the queue to drain")
        assert writer.send_data(9, memoryview(bulk))   # a worker's blocking send, after them
        thread.join(30)
        assert got[:len(posted)] == posted
        assert b"".join(p for c, i, p in got[len(posted):]) == bulk
    finally:
        near.close()
        far.close()


def test_has_buffered_after_a_short_read(pki):
    near, far, errors = handshake_pair(device_tls(pki), server_tls(pki))
    try:
        near.sendall(bytes(range(256)) * 40)   # one write: one TLS record of 10240 bytes
        buf = bytearray(100)
        wait_for(lambda: _readable(far), what="the record")
        assert far.recv_into(buf, 100, socket.MSG_DONTWAIT) == 100 and far.has_buffered()
        assert not _readable(far)    # the rest is inside OpenSSL, the socket is drained
        assert read_exactly(far, 10240 - 100) == (bytes(range(256)) * 40)[100:]
        with pytest.raises(BlockingIOError):
            far.recv_into(buf, 0, socket.MSG_DONTWAIT)
        assert not far.has_buffered()
    finally:
        near.close()
        far.close()


def _readable(transport):
    import select
    return bool(select.select([transport.fileno()], [], [], 0)[0])


def test_the_link_reads_plaintext_that_no_readability_announces(pki):
    """A socket read that decrypts to more than the link's free buffer: the rest
    waits inside the transport, the socket is drained and stays quiet, and only
    the link's has_buffered() re-read delivers it.  Made certain here with a
    64 KB frame buffer, a 100 KB burst of small frames already in the socket and
    reads of 256 KB; in production the free tail of the 1 MB buffer can be
    shorter than a 64 KB read plus a partial record.  Fails without
    Link._on_uplink_buffered (the link then waits forever)."""
    from tcprc.device.link import device_link
    from tcprc.device.policy import TargetPolicy
    from tcprc.wire.session import DeviceSession
    echo = Service("echo")
    near, far = tcp_pair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    device = TlsTransport(near, device_tls(pki), recv_chunk=256 * 1024)
    server = TlsTransport(far, server_tls(pki))
    shaker = threading.Thread(target=server.handshake, args=(10,))
    shaker.start()
    device.handshake(10)
    shaker.join(10)
    chunks = [b"%04d" % n * 10 for n in range(2300)]
    burst = protocol.encode(protocol.CONNECT, 1, protocol.encode_connect_payload("", 0)) + \
        b"".join(protocol.encode(protocol.DATA, 1, c) for c in chunks)
    server.sendall(burst)
    records = -(-len(burst) // 16384)
    wait_for(lambda: _queued(near) == len(burst) + 22 * records, what="the burst in the socket")
    link = device_link(device, Loop(), DeviceSession(),
                       settings("device", server="127.0.0.1:1", local="%s:%d" % echo.address),
                       "uplink test", TargetPolicy(echo.address, set()))
    link.frames = FrameBuffer(65540)   # a read takes at most 64 KB
    thread = threading.Thread(target=link.run)
    thread.start()
    try:
        decoder = FrameBuffer()
        echoed = bytearray()
        far.settimeout(10)
        want = sum(map(len, chunks))
        while len(echoed) < want:
            if not decoder.receive(server):
                break
            echoed += b"".join(bytes(p) for c, i, p in decoder.frames() if c == protocol.DATA)
        assert bytes(echoed) == b"".join(chunks)
    finally:
        link.stop("test over")
        thread.join(10)
        server.close()
        echo.close()


def _queued(sock):
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


# ---- the bulk paths --------------------------------------------------------------------
def _record_lengths(data):
    """The lengths of the whole TLS records at the start of `data`, and where they end."""
    lengths, at = [], 0
    while at + 5 <= len(data):
        size = int.from_bytes(data[at + 3:at + 5], "big")
        if at + 5 + size > len(data):
            break
        lengths.append(size)
        at += 5 + size
    return lengths, at


def _raw_records(sock, count):
    """Ciphertext read off the socket itself until `count` whole records are in it."""
    got = bytearray()
    sock.settimeout(10)
    while len(_record_lengths(got)[0]) < count:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed early"
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("sizes", [
    [4, 65535] * 16,                # 16 DATA frames: one pump read
    [4, 100],                       # a small frame: one record
    [4, 16380],                     # exactly one record
    [4, 16381],                     # one byte over
    [1, 0, 40000, 3, 16384, 70000, 5],
    [300000],
])
def test_parts_go_out_as_full_records_never_one_per_part(pki, sizes):
    """sendmsg encrypts its parts as one byte stream: every record but the last
    carries 16 KB (a frame header never becomes a record of its own), and the
    bytes are the parts', in order, across the records the scratch copy joins."""
    near, far, errors = handshake_pair(device_tls(pki), server_tls(pki))
    assert errors == [None, None]
    try:
        parts = [os.urandom(n) for n in sizes]
        total = sum(sizes)
        assert near.sendmsg([memoryview(p) for p in parts]) == total
        records = -(-total // 16384)
        raw = _raw_records(far.sock, records)
        lengths, end = _record_lengths(raw)
        assert len(lengths) == records and end == len(raw)
        overhead = lengths[0] - min(total, 16384)   # content type and AEAD tag
        assert lengths[:-1] == [16384 + overhead] * (records - 1)
        assert lengths[-1] == total - 16384 * (records - 1) + overhead
        far._incoming.write(raw)   # what the test read past the transport, handed back
        assert read_exactly(far, total) == b"".join(parts)
    finally:
        near.close()
        far.close()


def test_one_read_takes_all_that_the_socket_holds(pki):
    """A read of a large buffer decrypts every record already delivered, as a plain
    socket's read takes all it holds, not one socket read's worth (64 KB) per
    call of the link."""
    near, far, errors = handshake_pair(device_tls(pki), server_tls(pki))
    try:
        far.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        data = os.urandom(300 * 1024)
        near.sendall(data)
        wait_for(lambda: _queued(far.sock) >= len(data), what="the records in the socket")
        buf = bytearray(1 << 20)
        assert far.recv_into(buf, 0, socket.MSG_DONTWAIT) == len(data)
        assert bytes(buf[:len(data)]) == data and not far.has_buffered()
    finally:
        near.close()
        far.close()


# ---- bulk through two links -------------------------------------------------------------
def test_sixteen_streams_both_ways_at_once_through_tls_three_times(pki):
    """Pump threads encrypt while the link thread decrypts, on both sides at once
    (issue 12 item 3): every byte arrives, sha256 intact, three rounds."""
    echo = Service("echo")
    tunnel = TlsTunnel(echo.address, pki)
    try:
        for round_ in range(3):
            results = {}

            def client(n):
                data = pattern((1 << 20) + n * 4099, seed=round_ * 16 + n)
                with socket.create_connection(tunnel.host, timeout=60) as conn:
                    sender = threading.Thread(target=conn.sendall, args=(data,))
                    sender.start()
                    back = recv_exactly(conn, len(data))
                    sender.join(60)
                results[n] = hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert len(results) == 16 and all(results.values()), (round_, results)
        assert not tunnel.device.end_reason and not tunnel.server.end_reason
    finally:
        tunnel.close()
        echo.close()


# ---- an orderly close: close_notify -----------------------------------------------------
def _end_of_tls_stream(transport):
    """How the peer's TLS stream ended, as its SSLObject sees it once the TCP
    connection closed: "close_notify" or "ragged", and the plaintext before the end.

    The verdict is OpenSSL's own: our half of the shutdown (unwrap) completes
    only once the peer's close_notify was received.  `transport` must come from
    observing_server_tls(), which lets OpenSSL tell a truncation."""
    import ssl
    transport.sock.settimeout(10)
    while True:
        data = transport.sock.recv(65536)
        if not data:
            break
        transport._incoming.write(data)
    transport._incoming.write_eof()
    plain = bytearray()
    try:
        while True:
            data = transport.ssl.read(65536)
            if not data:
                break
            plain += data
    except ssl.SSLZeroReturnError:
        pass
    except ssl.SSLError:   # SSLEOFError; 3.8: a plain SSLError, "unexpected eof"
        return "ragged", bytes(plain)
    try:
        transport.ssl.unwrap()
        return "close_notify", bytes(plain)
    except ssl.SSLError:
        return "ragged", bytes(plain)


def observing_server_tls(pki):
    """The server's context, but with a missing close_notify reported as an error:
    3.8 sets OpenSSL's SSL_OP_IGNORE_UNEXPECTED_EOF (0x80; no ssl constant there),
    which makes a bare TCP EOF look like close_notify."""
    tls = server_tls(pki)
    tls.context.options &= ~getattr(__import__("ssl"), "OP_IGNORE_UNEXPECTED_EOF", 0x80)
    return tls


def test_a_writer_closed_in_order_sends_close_notify(pki):
    """FrameWriter.close() on an idle uplink: the peer reads a clean end of the
    TLS stream (SSLZeroReturnError), after the frames sent before it."""
    device, server, errors = handshake_pair(device_tls(pki), observing_server_tls(pki))
    assert errors == [None, None]
    writer = FrameWriter(device)
    try:
        writer.send_frame(protocol.encode(protocol.LISTEN, 0))
        writer.close()
        device.shutdown()
        how, plain = _end_of_tls_stream(server)
        assert (how, plain) == ("close_notify", protocol.encode(protocol.LISTEN, 0))
    finally:
        device.close()
        server.close()


def test_a_failed_writer_sends_no_close_notify(pki):
    """After a send failed the writer says nothing more: the end is ragged, as a
    broken connection is (no alert after a record that may have been cut)."""
    device, server, errors = handshake_pair(device_tls(pki), observing_server_tls(pki))
    assert errors == [None, None]
    writer = FrameWriter(device)
    try:
        writer._failed(OSError(32, "Broken pipe"))
        writer.close()
        device.shutdown()
        assert _end_of_tls_stream(server) == ("ragged", b"")
    finally:
        device.close()
        server.close()


def test_a_tls_link_that_stops_sends_close_notify(pki):
    """A real DeviceLink over TLS on a TCP connection, stopped as an agent stops
    it: its peer reads the LISTEN, then close_notify, not a ragged EOF."""
    from tcprc.device.link import device_link
    from tcprc.device.policy import TargetPolicy
    from tcprc.wire.session import DeviceSession
    echo = Service("echo")
    device, server, errors = handshake_pair(device_tls(pki), observing_server_tls(pki))
    assert errors == [None, None]
    link = device_link(device, Loop(), DeviceSession(),
                       settings("device", server="127.0.0.1:1", local="%s:%d" % echo.address),
                       "uplink test", TargetPolicy(echo.address, set()))
    thread = threading.Thread(target=link.run)
    thread.start()
    try:
        wait_for(lambda: link.writer.bytes_sent or _queued(server.sock), what="the LISTEN")
        link.stop("test over")
        assert link.wait_stopped(10)
        how, plain = _end_of_tls_stream(server)
        assert how == "close_notify"
        assert plain.startswith(protocol.encode(protocol.LISTEN, 0)), plain[:16]
    finally:
        link.stop("test over")
        thread.join(10)
        server.close()
        echo.close()
