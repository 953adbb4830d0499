"""The fast paths of the pumps and loops, and the plain paths they fall back to.

The zero-copy pump is opt-in (TCPRC_SPLICE=1 for the agents, `pump.SPLICE`
in process), and the link loops fall back to select.poll where epoll is
missing (`loop.USE_EPOLL`); every behaviour here runs on each path, so none
can rot unnoticed.  Idle streams must stay cheap whatever the path.
"""

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, Service, Tunnel, pattern, recv_exactly, start_tunnel, wait_for
from tcprc.engine import loop, pump
from tcprc.wire import frames as protocol
from tcprc.engine.buffers import FrameBuffer
from tcprc.engine.writer import FrameWriter

# "poll": the plain pumps, with the link loops on select.poll instead of epoll.
PATHS = (["splice"] if pump.SPLICE_AVAILABLE else []) + ["plain", "poll"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(pump, "SPLICE", request.param == "splice")
    monkeypatch.setattr(loop, "USE_EPOLL", loop.USE_EPOLL and request.param != "poll")
    return request.param


def _proc_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def _pipes(pid):
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


# ---- the writer on its own ----------------------------------------------------------
@pytest.mark.skipif(not pump.SPLICE_AVAILABLE, reason="no os.splice on this interpreter")
def test_send_spliced_puts_exactly_one_frame_on_the_wire():
    near, far = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        writer = FrameWriter(near)
        writer.post(protocol.CLOSE, 9)                 # a queued control frame goes first
        payload = pattern(40000)
        os.write(write_end, payload)
        assert writer.send_spliced(7, read_end, len(payload), lambda: True)
        expected = protocol.encode(protocol.CLOSE, 9) + protocol.encode(protocol.DATA, 7, payload)
        far.settimeout(5)
        assert recv_exactly(far, len(expected)) == expected
        assert writer.bytes_sent == len(payload)
        # A stream closed meanwhile sends nothing; its bytes stay in the pipe.
        os.write(write_end, b"late")
        assert not writer.send_spliced(7, read_end, 4, lambda: False)
        near.send(b"!")
        assert far.recv(16) == b"!"
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        near.close()
        far.close()


def _read_frames(sock, total_payload):
    """Decode DATA frames from `sock` until `total_payload` bytes came: [(id, payload)]."""
    frames, got = [], 0
    while got < total_payload:
        length, command, client_id = protocol.HEADER.unpack(recv_exactly(sock, 4))
        assert command == protocol.DATA
        frames.append((client_id, recv_exactly(sock, length)))
        got += length
    return frames


def test_send_data_cuts_a_long_read_into_whole_frames():
    near, far = socket.socketpair()
    try:
        writer = FrameWriter(near)
        data = pattern(150000)
        assert writer.send_data(5, memoryview(data))
        far.settimeout(5)
        frames = _read_frames(far, len(data))
        assert [len(p) for _, p in frames] == [65535, 65535, 18930]
        assert {cid for cid, _ in frames} == {5}
        assert b"".join(p for _, p in frames) == data
        assert writer.bytes_sent == len(data)
        assert not writer.send_data(5, memoryview(b"late"), lambda: False)
    finally:
        near.close()
        far.close()


def _through_a_slow_reader(timeout_us, chunk, pause, want, send):
    """Run `send(writer)` into a reader that takes `chunk` bytes per `pause`
    seconds, with small buffers and a send timeout of `timeout_us`, so
    sendmsg returns short; the bytes the reader got, once it has `want`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    reader.connect(listener.getsockname())
    sender, _ = listener.accept()
    listener.close()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, timeout_us))
    received = bytearray()

    def read_slowly():
        reader.settimeout(10)
        while len(received) < want:
            data = reader.recv(chunk)
            if not data:
                break
            received.extend(data)
            time.sleep(pause)

    thread = threading.Thread(target=read_slowly)
    thread.start()
    try:
        send(FrameWriter(sender))
        thread.join(20)
        return bytes(received)
    finally:
        thread.join(20)
        sender.close()
        reader.close()


def _payloads_of(stream, client_id):
    frames, offset = [], 0
    while offset < len(stream):
        length, command, cid = protocol.HEADER.unpack_from(stream, offset)
        assert (command, cid) == (protocol.DATA, client_id)
        frames.append(bytes(stream[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return frames


def test_single_frame_send_data_resumes_after_a_short_sendmsg():
    # A reader this slow makes a 64 KB frame outlast the 50 ms send timeout,
    # so the kernel takes part of the one-frame sendmsg.
    frames = [pattern(65535, seed=n) for n in range(3)]
    counted = []

    def send(writer):
        for frame in frames:
            assert writer.send_data(9, memoryview(frame))
        counted.append(writer.bytes_sent)

    wire = _through_a_slow_reader(50000, 8192, 0.02, 3 * (65535 + 4), send)
    assert _payloads_of(wire, 9) == frames
    assert counted == [3 * 65535]


def test_send_data_resumes_after_a_partial_sendmsg():
    # The same for one send_data of many frames (one sendmsg for all of them).
    data = pattern(1500000)
    wire = _through_a_slow_reader(150000, 32768, 0.01, len(data) + 4 * 23,
                                  lambda writer: writer.send_data(3, memoryview(data)))
    assert b"".join(_payloads_of(wire, 3)) == data


# ---- in process, both paths ---------------------------------------------------------
def test_bulk_both_ways_is_byte_exact(path):
    source, sink = Service("source"), Service("sink")
    t_source, t_sink = Tunnel(source.address), Tunnel(sink.address)
    try:
        size = 6 * 1024 * 1024 + 12345          # not a multiple of a frame
        with t_source.client() as c:
            c.sendall(struct.pack("!Q", size))
            got = recv_exactly(c, size)
        assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size)).digest()
        with t_sink.client() as c:
            c.sendall(struct.pack("!Q", size))
            c.sendall(pattern(size))
            assert recv_exactly(c, 32) == hashlib.sha256(pattern(size)).digest()
        status = t_sink.device.status()
        assert status["bytes_down"] >= size
    finally:
        t_source.close()
        t_sink.close()
        source.close()
        sink.close()


def test_many_small_writes_keep_their_order(path, service):
    t = Tunnel(service.address)
    try:
        clients = [t.client() for _ in range(8)]
        expected = {}
        for i, c in enumerate(clients):
            expected[i] = b"".join(b"%d:%d;" % (i, n) for n in range(300))

        def talk(i, c):
            for n in range(300):
                c.sendall(b"%d:%d;" % (i, n))

        threads = [threading.Thread(target=talk, args=(i, c)) for i, c in enumerate(clients)]
        for th in threads:
            th.start()
        for i, c in enumerate(clients):
            assert recv_exactly(c, len(expected[i])) == expected[i]
        for th in threads:
            th.join(10)
        for c in clients:
            c.close()
        wait_for(lambda: t.device.status()["clients"] == 0, what="streams closed")
    finally:
        t.close()


def test_a_stream_closed_by_the_peer_mid_transfer_ends_cleanly(path):
    # The device's service sends a lot and hangs up: the client gets all of it, then EOF.
    source = Service("source")
    t = Tunnel(source.address)
    try:
        for _ in range(3):
            with t.client() as c:
                c.sendall(struct.pack("!Q", 300000))
                assert recv_exactly(c, 300000) == pattern(300000)
                c.settimeout(5)
                assert c.recv(1) == b""
        wait_for(lambda: t.server.status()["clients"] == 0, what="server streams released")
    finally:
        t.close()
        source.close()


# ---- agent processes: the environment switch -----------------------------------------
@pytest.mark.parametrize("splice", [True, False])
def test_agents_honour_tcprc_splice(agents, monkeypatch, splice):
    if splice:
        if not pump.SPLICE_AVAILABLE:
            pytest.skip("no os.splice on this interpreter")
        monkeypatch.setenv("TCPRC_SPLICE", "1")
    else:
        monkeypatch.delenv("TCPRC_SPLICE", raising=False)   # the default
    svc = Service("echo")
    try:
        server, device, host = start_tunnel(agents, svc.address)
        idle_pipes = _pipes(device.pid)
        with socket.create_connection(host, timeout=20) as c:
            _echo_burst(c, 2 * 1024 * 1024)
            # The device's pump owns a pipe while its stream is open, on the splice path only.
            extra = _pipes(device.pid) - idle_pipes
            assert extra == (2 if splice else 0)
        wait_for(lambda: _pipes(device.pid) == idle_pipes, what="the pump's pipe to close")
    finally:
        svc.close()


def test_many_bulk_streams_read_one_frame_at_a_time(agents):
    # With 32 streams or more open a pump reads one frame's worth, so a crowd
    # of streams whose service has plenty to send (and clients that do not
    # read) cannot make every pump touch its whole 1 MB buffer.
    source = Service("source")
    try:
        server, device, host = start_tunnel(agents, source.address)
        clients = [socket.create_connection(host, timeout=10) for _ in range(32)]
        try:
            wait_for(lambda: source.accepted == 32, what="32 service connections")
            time.sleep(0.3)
            before = _proc_rss_kb(device.pid)
            for c in clients:
                c.sendall(struct.pack("!Q", 16 * 1024 * 1024))   # more than the buffers hold
            time.sleep(1.5)   # the pumps read, send, and stall on the full uplink
            grown = _proc_rss_kb(device.pid) - before
        finally:
            for c in clients:
                c.close()
        # One frame each: about 70 KB a stream here; 160 KB and more when every
        # pump reads as much as its socket holds (up to 1 MB).
        per_stream = grown / 32.0
        assert per_stream < 110, "device RSS grew %.0f KB per stalled bulk stream" % per_stream
    finally:
        source.close()


def test_idle_streams_cost_little_device_memory(agents):
    # Pump buffers are mapped lazily: an open stream that moved a few bytes
    # costs its thread stack and a page, not a 64 KB buffer.
    svc = Service("echo")
    try:
        server, device, host = start_tunnel(agents, svc.address)
        _warm_up(host, svc)
        before = _proc_rss_kb(device.pid)
        socks = _open_echoing(host, 100)
        per_stream = (_proc_rss_kb(device.pid) - before) / 100.0
        for s in socks:
            s.close()
        assert per_stream < 40, "%.1f KB per open stream" % per_stream
    finally:
        svc.close()


def _warm_up(host, svc):
    """One stream there and back and closed: first-use costs are paid before measuring."""
    warm = socket.create_connection(host, timeout=10)
    warm.sendall(b"w")
    assert recv_exactly(warm, 1) == b"w"
    warm.close()
    wait_for(lambda: svc.ended == 1, what="warm-up stream closed")


def _warm_and_idle(host, svc, device):
    """_warm_up, then wait for its pump to exit; the device's idle thread count."""
    _warm_up(host, svc)
    return wait_for(lambda: _threads(device.pid) <= 3 and _threads(device.pid),
                    what="the warm-up pump to exit")


def _echo_burst(conn, size):
    """`size` bytes through an echo service, sent and read back at once."""
    bulk = pattern(size)
    sender = threading.Thread(target=conn.sendall, args=(bulk,))
    sender.start()
    assert recv_exactly(conn, size) == bulk
    sender.join(10)


def _open_echoing(host, count):
    """`count` open streams, each having carried 64 bytes there and back."""
    socks = [socket.create_connection(host, timeout=10) for _ in range(count)]
    try:
        for s in socks:
            s.sendall(b"x" * 64)
        for s in socks:
            assert recv_exactly(s, 64) == b"x" * 64
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def test_buffers_give_their_far_pages_back_when_traffic_calms(agents):
    # An ssh session that copied a file, then stays open for hours: after a
    # bulk burst, the device's uplink buffer and the stream's pump buffer
    # (1 MB each) keep only their first 64 KB once small reads follow.
    svc = Service("echo")
    try:
        server, device, host = start_tunnel(agents, svc.address)
        conn = socket.create_connection(host, timeout=10)

        def ping(times):
            for _ in range(times):
                conn.sendall(b"p")
                assert recv_exactly(conn, 1) == b"p"

        ping(5)
        calm = _proc_rss_kb(device.pid)
        _echo_burst(conn, 8 * 1024 * 1024)
        after_bulk = _proc_rss_kb(device.pid)
        assert after_bulk - calm > 1000, "the bulk burst touched only %d KB" % (after_bulk - calm)
        ping(40)
        after_calm = _proc_rss_kb(device.pid)
        assert after_bulk - after_calm > 1000, \
            "RSS %d KB after the burst, %d KB after 40 small round trips" % (after_bulk, after_calm)
        conn.close()
    finally:
        svc.close()


def test_the_uplink_buffer_gives_its_bulk_pages_back_when_the_last_stream_closes(agents):
    # After a bulk burst the uplink may carry nothing more for hours: the
    # last stream's close is when the device's uplink buffer calms down.
    # (The pump's buffer goes with its stream; this is the other 1 MB.)
    svc = Service("echo")
    try:
        server, device, host = start_tunnel(agents, svc.address)
        idle_threads = _warm_and_idle(host, svc, device)
        calm = _proc_rss_kb(device.pid)
        conn = socket.create_connection(host, timeout=10)
        _echo_burst(conn, 8 * 1024 * 1024)
        peak = _proc_rss_kb(device.pid)
        conn.close()
        wait_for(lambda: _threads(device.pid) == idle_threads, what="the pump to exit")
        wait_for(lambda: _proc_rss_kb(device.pid) - calm < 400, timeout=5,
                 what="RSS back within 400 KB of %d KB (it peaked at %d KB)" % (calm, peak))
    finally:
        svc.close()


def _threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def test_device_memory_returns_near_idle_after_200_streams(agents):
    # What 200 streams leave behind once closed is the interpreter's
    # allocator keeping the pages their Python objects used, so each stream
    # must allocate few of them.  As deployed: byte-compiled modules (a
    # start that compiles them leaves free pages the streams then reuse,
    # which would hide the cost) and the deployed malloc settings.  Before
    # the pumps were trimmed: 1.7 MB (3.11) and 2.3 MB (3.8) stayed behind;
    # now about 0.6 and 1.0 MB (up to 3.10 frames come from malloc).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "tcprc")],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    limit = 900 if sys.version_info >= (3, 11) else 1300
    svc = Service("echo")
    deployed = {"MALLOC_ARENA_MAX": "1", "GLIBC_TUNABLES": "glibc.pthread.stack_cache_size=0"}
    try:
        server, device, host = start_tunnel(agents, svc.address, device_env=deployed)
        idle_threads = _warm_and_idle(host, svc, device)
        idle = _proc_rss_kb(device.pid)
        for s in _open_echoing(host, 200):
            s.close()
        wait_for(lambda: _threads(device.pid) == idle_threads, what="every pump to exit")
        left = _proc_rss_kb(device.pid) - idle
        assert left < limit, "200 closed streams left %d KB behind" % left
    finally:
        svc.close()


def test_an_idle_frame_buffer_costs_no_memory():
    # The uplink's 1 MB decode buffer is mapped lazily: eight idle ones
    # cost almost nothing, where zero-filled bytearrays would cost 8 MB.
    before = _proc_rss_kb(os.getpid())
    buffers = [FrameBuffer() for _ in range(8)]
    grown = _proc_rss_kb(os.getpid()) - before
    assert grown < 512, "%d KB for 8 idle frame buffers" % grown
    # ...and they still decode.
    for buf in buffers:
        frame = protocol.encode(protocol.DATA, 1, b"abc")
        buf.writable()[:len(frame)] = frame
        buf.filled(len(frame))
        assert [(c, i, bytes(p)) for c, i, p in buf.frames()] == [(protocol.DATA, 1, b"abc")]


# ---- the link hands a run of DATA frames to its socket in one sendmsg ---------------
class Recorder:
    """A service that keeps every byte of each connection, read after `delay` seconds."""

    def __init__(self, delay=0.0):
        self.sock = socket.socket()
        # Small before listen(), so the accepted socket advertises a small window.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.address = self.sock.getsockname()
        self.delay = delay
        self.done = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            time.sleep(self.delay)
            conn.settimeout(10)
            data = bytearray()
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.done.append(bytes(data))

    def close(self):
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def raw_device():
    from test_legacy_interop import LegacyServer
    from tcprc.device.app import DeviceApp
    from conftest import settings
    made = []

    def start(target):
        srv = LegacyServer()
        app = DeviceApp(settings("device", server=srv.address, local="%s:%d" % target,
                                 reconnect_min=0.05, reconnect_max=0.2))
        app.start()
        peer = srv.accept()
        assert peer.read_frame() == (protocol.LISTEN, 0, b"")
        made.append((srv, app, peer))
        return app, peer

    yield start
    for srv, app, peer in made:
        app.close()
        peer.close()
        srv.close()


def _connect_frame(client_id):
    return protocol.encode(protocol.CONNECT, client_id, protocol.encode_connect_payload("", 0))


def test_interleaved_runs_of_two_streams_keep_each_order(raw_device, service):
    app, peer = raw_device(service.address)
    peer.send_raw(_connect_frame(1) + _connect_frame(2))
    wait_for(lambda: service.accepted == 2 and app.status()["clients"] == 2, what="two streams")
    frames = [(1, b"a1"), (1, b"a2"), (2, b"b1"), (1, b"a3"), (2, b"b2"), (2, b"b3"), (2, b"b4")]
    peer.send_raw(b"".join(protocol.encode(protocol.DATA, cid, p) for cid, p in frames))
    echoed = {1: b"", 2: b""}
    while echoed != {1: b"a1a2a3", 2: b"b1b2b3b4"}:
        command, cid, payload = peer.read_frame()
        assert command == protocol.DATA
        echoed[cid] += payload
        assert len(echoed[1]) <= 6 and len(echoed[2]) <= 8, echoed


def test_a_run_larger_than_the_socket_takes_then_close_arrives_whole(raw_device):
    # One write: 120 frames (7.8 MB) for a service that reads nothing for a while, then
    # CLOSE. What sendmsg did not take waits on the stream, in order; the
    # service gets every byte, then EOF.
    recorder = Recorder(delay=0.3)
    try:
        app, peer = raw_device(recorder.address)
        peer.send_raw(_connect_frame(4))
        wait_for(lambda: app.status()["clients"] == 1, what="the stream")
        data = pattern(120 * 65535 - 777)
        wire = b"".join(protocol.encode(protocol.DATA, 4, data[i:i + 65535])
                        for i in range(0, len(data), 65535))
        peer.send_raw(wire + protocol.encode(protocol.CLOSE, 4))
        wait_for(lambda: recorder.done, timeout=15, what="the service to see EOF")
        assert recorder.done[0] == data
    finally:
        recorder.close()


def test_a_run_for_an_unknown_id_gets_one_close(raw_device, service):
    # Held for its CONNECT (test_early_data.py), then answered once, not per frame.
    app, peer = raw_device(service.address)
    peer.send_raw(b"".join(protocol.encode(protocol.DATA, 9, b"lost%d" % i) for i in range(3)))
    assert peer.read_frame() == (protocol.CLOSE, 9, b"")
    peer.send(protocol.DATA, 9, b"late")
    peer.nothing_for(0.3)


def test_empty_data_frames_alone_or_in_a_run_are_ignored(raw_device, service):
    app, peer = raw_device(service.address)
    peer.send_raw(_connect_frame(6))
    wait_for(lambda: service.accepted == 1 and app.status()["clients"] == 1, what="the stream")
    peer.send(protocol.DATA, 6, b"")                  # alone: nothing to write
    peer.send_raw(protocol.encode(protocol.DATA, 6, b"") + protocol.encode(protocol.DATA, 6, b"ok")
                  + protocol.encode(protocol.DATA, 6, b""))
    assert peer.read_frame() == (protocol.DATA, 6, b"ok")
    peer.nothing_for(0.2)
    assert app.status()["clients"] == 1


# ---- pump threads -------------------------------------------------------------------
def test_pump_thread_joins_with_a_bound_and_reports_its_end():
    release = threading.Event()
    thread = pump.PumpThread("tcprc-pump-test", release.wait, (10,))
    assert thread.is_alive()
    assert thread.join(0.05) is False
    release.set()
    assert thread.join(5) is True
    assert not thread.is_alive()


def test_an_error_escaping_a_pump_reaches_threading_excepthook(monkeypatch):
    seen = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: seen.append((args.exc_type, str(args.exc_value), args.thread.name)))

    def broken():
        raise RuntimeError("boom")

    thread = pump.PumpThread("tcprc-pump-7", broken, ())
    assert thread.join(5)
    assert seen == [(RuntimeError, "boom", "tcprc-pump-7")]


def test_a_running_pump_thread_allocates_little():
    # threading.Thread allocates about 3 KB of objects per running thread
    # (traced here); a pump thread must stay well under half of that.
    import tracemalloc
    gate = threading.Event()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        threads = [pump.PumpThread("p%d" % n, gate.wait, (10,)) for n in range(50)]
        per_thread = (tracemalloc.get_traced_memory()[0] - base) / 50.0
    finally:
        gate.set()
        tracemalloc.stop()
    assert all(t.join(5) for t in threads)
    assert per_thread < 1500, "%.0f bytes per pump thread" % per_thread


def test_a_stream_that_never_queues_allocates_no_queue():
    # Most streams never hold bytes back from their socket; a deque would
    # cost each of them a 528-byte block (with one, a Stream traced 1178 B).
    import tracemalloc
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        streams = [pump.Stream(n % 256, "127.0.0.1:%d" % (10000 + n)) for n in range(200)]
        per_stream = (tracemalloc.get_traced_memory()[0] - base) / 200.0
    finally:
        tracemalloc.stop()
    assert per_stream < 700, "%.0f bytes per idle Stream" % per_stream
    stream = streams[0]
    stream.queue(memoryview(b"abc"))
    assert stream.pending and stream.pending_bytes == 3
    stream.drop_pending()
    assert not stream.pending and stream.pending_bytes == 0


def test_pump_threads_are_os_threads_that_end():
    gate, tids, lock = threading.Event(), [], threading.Lock()

    def body():
        with lock:
            tids.append(threading.get_native_id())
        gate.wait(10)

    threads = [pump.PumpThread("p%d" % n, body, ()) for n in range(20)]
    wait_for(lambda: len(tids) == 20, what="20 pump threads running")
    assert all(os.path.exists("/proc/self/task/%d" % tid) for tid in tids)
    gate.set()
    assert all(t.join(5) for t in threads)
    wait_for(lambda: not any(os.path.exists("/proc/self/task/%d" % tid) for tid in tids),
             what="the 20 threads to end")
