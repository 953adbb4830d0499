"""FrameWriter on its own: whole frames on the wire, resumed after short sends."""

import os
import socket
import struct
import threading
import time

import pytest

from support.net import recv_exactly
from support.services import pattern
from tcprc.engine import pump
from tcprc.wire import frames as protocol
from tcprc.engine.writer import FrameWriter


# ---- the writer on its own ----------------------------------------------------------
@pytest.mark.skipif(not pump.SPLICE_AVAILABLE, reason="no os.splice on this interpreter")
def test_send_spliced_puts_exactly_one_frame_on_the_wire():
    near, far = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        writer = FrameWriter(near)
        writer.post(protocol.encode(protocol.CLOSE, 9))   # a queued control frame goes first
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
