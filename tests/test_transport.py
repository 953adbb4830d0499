"""One conformance suite, run against every uplink transport (as CPython's selectors
tests run against every selector).  A new transport joins by adding a factory
to TRANSPORTS: a function returning (near, far), two connected transports."""

import os
import socket
import threading

import pytest

from support.net import read_exactly, tcp_pair
from support.waiting import wait_for
from tcprc.engine.buffers import FrameBuffer
from tcprc.engine.loop import Loop
from tcprc.engine.transport import PlainTransport, Transport
from tcprc.engine.writer import FrameWriter
from tcprc.wire import frames

_DONTWAIT = socket.MSG_DONTWAIT


def plain_socketpair():
    near, far = socket.socketpair()
    return PlainTransport(near), PlainTransport(far)


def plain_tcp():
    near, far = tcp_pair()
    return PlainTransport(near), PlainTransport(far)


def tls_tcp():
    from support.tls import tls_transport_pair
    return tls_transport_pair()


TRANSPORTS = [plain_socketpair, plain_tcp, tls_tcp]


@pytest.fixture(params=TRANSPORTS, ids=lambda f: f.__name__)
def pair(request):
    near, far = request.param()
    yield near, far
    for t in (near, far):
        t.close()


def test_is_a_transport_with_a_file_descriptor(pair):
    near, far = pair
    assert isinstance(near, Transport) and near.fileno() >= 0 and far.fileno() != near.fileno()


def test_send_sendall_and_sendmsg_arrive_in_order(pair):
    near, far = pair
    assert near.send(b"ab") == 2
    near.sendall(b"cd", getattr(socket, "MSG_MORE", 0))
    assert near.sendmsg([b"ef", memoryview(b"gh")]) == 4
    assert read_exactly(far, 8) == b"abcdefgh"


def test_recv_into_without_waiting_raises_when_empty(pair):
    near, far = pair
    buf = bytearray(16)
    with pytest.raises(BlockingIOError):
        far.recv_into(buf, 0, _DONTWAIT)
    near.send(b"x")
    wait_for(lambda: _ready(far), what="the byte to arrive")
    assert far.recv_into(buf, 0, _DONTWAIT) == 1 and buf[:1] == b"x"


def _ready(transport):
    import select
    return select.select([transport.fileno()], [], [], 0)[0]


def test_send_without_waiting_stops_when_full(pair):
    near, far = pair
    chunk = bytes(1 << 16)
    total = 0
    with pytest.raises(BlockingIOError):
        for _ in range(10000):   # bounded: kernel buffers are far smaller than 640 MB
            total += near.send(chunk, _DONTWAIT)
    assert total > 0
    assert read_exactly(far, total) == bytes(total)


def test_shutdown_wakes_a_blocked_reader_with_eof(pair):
    near, far = pair
    result = []
    reader = threading.Thread(target=lambda: result.append(far.recv_into(bytearray(8))))
    reader.start()
    far.shutdown()
    reader.join(10)
    assert result == [0]
    far.shutdown()   # quiet the second time


def test_the_peer_closing_reads_as_eof(pair):
    near, far = pair
    near.sendall(b"last")
    near.close()
    assert read_exactly(far, 4) == b"last"
    assert far.recv_into(bytearray(8)) == 0


def test_a_loop_watches_it(pair):
    near, far = pair
    loop = Loop()
    seen = []

    def readable():
        seen.append(far.recv_into(bytearray(8), 0, _DONTWAIT))
        loop.stop()
    loop.set_handlers(far, readable, None)
    near.send(b"wake")
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(10)
    loop.close()
    assert seen == [4]


def test_frames_written_and_decoded_over_it(pair):
    near, far = pair
    writer = FrameWriter(near)
    bulk = os.urandom(3 * frames.MAX_PAYLOAD + 17)
    got = []
    decoder = FrameBuffer()

    def read_all():
        while len(got) < 6:
            if not decoder.receive(far):
                return
            got.extend((c, i, bytes(p)) for c, i, p in decoder.frames())
    reader = threading.Thread(target=read_all)
    reader.start()
    assert writer.send_data(5, memoryview(bulk))            # four DATA frames, one sendmsg
    assert writer.post(frames.encode(frames.CLOSE, 5)) and writer.flush_nowait() == FrameWriter.DONE
    assert writer.send_frame(frames.encode(frames.LISTEN, 0))
    reader.join(10)
    data = b"".join(p for c, i, p in got if c == frames.DATA and i == 5)
    assert data == bulk and got[-2:] == [(frames.CLOSE, 5, b""), (frames.LISTEN, 0, b"")]
    assert writer.bytes_sent == len(bulk)


def test_splice_from_a_pipe_where_it_can(pair):
    near, far = pair
    if not near.can_splice:
        pytest.skip("this transport (or interpreter) cannot splice")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"spliced")
        near.splice_from(read_end, 7)
        assert read_exactly(far, 7) == b"spliced"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_tcp_info_is_bytes_or_none(pair):
    near, far = pair
    info = near.tcp_info(104)
    assert info is None or (isinstance(info, bytes) and len(info) <= 104)
    near.quick_ack()   # harmless on any transport
