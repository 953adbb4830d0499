"""The frame codec against PROTOCOL.md's bytes, and decoding across any TCP chunking."""

import random

import pytest

from tcprc.wire import frames as protocol
from tcprc.engine.buffers import FrameBuffer
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN, ProtocolError


def test_byte_examples_of_the_reference():
    assert protocol.encode(LISTEN, 0) == bytes.fromhex("00000400")
    assert protocol.encode(CLOSE, 7) == bytes.fromhex("00000207")
    assert protocol.encode(DATA, 7, b"hi") == bytes.fromhex("000203076869")
    connect = protocol.encode(CONNECT, 7, protocol.encode_connect_payload("127.0.0.1", 23))
    assert connect == bytes.fromhex("000d0107000931323" "72e302e302e310017")


def test_payload_limit():
    assert len(protocol.encode(DATA, 1, b"x" * 65535)) == 65539
    with pytest.raises(ValueError):
        protocol.encode(DATA, 1, b"x" * 65536)


def test_connect_payload_round_trip_and_empty_address():
    for address, port in (("127.0.0.1", 23), ("", 23), ("device.local", 65535), ("::1", 22)):
        payload = protocol.encode_connect_payload(address, port)
        assert protocol.decode_connect_payload(payload) == (address, port)


@pytest.mark.parametrize("payload, problem", [
    (b"", "too short"),
    (b"\x00\x09127.0.0.1", "does not match"),              # port missing
    (b"\x00\x02ab\x00\x17extra", "does not match"),          # trailing bytes
    (b"\x00\x02\xff\xfe\x00\x17", "not ASCII"),
    (b"\x00\x02a\n\x00\x17", "control characters"),
])
def test_malformed_connect_payloads_are_refused(payload, problem):
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode_connect_payload(payload)


def _sample_frames(rng):
    frames = [(LISTEN, 0, b""), (CONNECT, 1, protocol.encode_connect_payload("", 23))]
    for _ in range(60):
        size = rng.choice([0, 1, 2, 3, 4, 5, 100, 4096, 65535])
        frames.append((rng.choice([DATA, CLOSE, 77]), rng.randrange(256), rng.randbytes(size)
                       if hasattr(rng, "randbytes") else bytes(rng.getrandbits(8) for _ in range(size))))
    return frames


def _decode_in_chunks(wire, chunk_sizes, size=256 * 1024):
    buf, out, pos = FrameBuffer(size), [], 0
    sizes = iter(chunk_sizes)
    while pos < len(wire):
        room = buf.writable()
        take = min(next(sizes), len(room), len(wire) - pos)
        room[:take] = wire[pos:pos + take]
        buf.filled(take)
        pos += take
        out.extend((c, i, bytes(p)) for c, i, p in buf.frames())
    return out, buf


@pytest.mark.parametrize("chunking", ["bytewise", "random", "large"])
def test_decoder_handles_any_chunking(chunking):
    rng = random.Random(42)
    frames = _sample_frames(rng)
    wire = b"".join(protocol.encode(c, i, p) for c, i, p in frames)
    if chunking == "bytewise":
        sizes = [1] * len(wire)
    elif chunking == "random":
        sizes = [rng.randint(1, 70000) for _ in range(len(wire))]
    else:
        sizes = [1 << 30] * len(wire)
    decoded, buf = _decode_in_chunks(wire, sizes)
    assert decoded == frames
    assert buf.pending() == 0 and buf.incomplete_frame() is None


def test_decoder_never_grows_and_compacts_partial_frames():
    # A buffer of exactly one maximal frame must still carry frames of every size.
    rng = random.Random(1)
    frames = [(DATA, 1, bytes([n % 256]) * rng.choice([65535, 3, 40000])) for n in range(30)]
    wire = b"".join(protocol.encode(*f) for f in frames)
    decoded, _ = _decode_in_chunks(wire, [rng.randint(1, 90000) for _ in range(len(wire))],
                                   size=protocol.HEADER_SIZE + protocol.MAX_PAYLOAD)
    assert decoded == frames


def test_incomplete_frame_is_described():
    buf = FrameBuffer()
    wire = protocol.encode(DATA, 9, b"abcdef")[:7]
    buf.writable()[:7] = wire
    buf.filled(7)
    assert list(buf.frames()) == []
    assert buf.incomplete_frame() == "DATA frame for client 9 with 3 of 6 payload bytes"
    buf2 = FrameBuffer()
    buf2.writable()[:2] = b"\x00\x01"
    buf2.filled(2)
    assert buf2.incomplete_frame() == "2 of 4 header bytes"


def test_buffer_must_hold_a_maximal_frame():
    with pytest.raises(ValueError):
        FrameBuffer(1000)


def test_receive_reads_a_real_socket_across_chunks_and_reports_eof():
    import socket
    a, b = socket.socketpair()
    try:
        frames = [(DATA, 3, b"x" * 70), (CLOSE, 3, b""), (DATA, 4, b"y" * 65535), (DATA, 5, b"z")]
        a.sendall(b"".join(protocol.encode(*f) for f in frames))
        a.close()
        # Room for one maximal frame only: the receives must compact as they go.
        buf, out = FrameBuffer(protocol.HEADER_SIZE + protocol.MAX_PAYLOAD), []
        while buf.receive(b):
            out.extend((c, i, bytes(p)) for c, i, p in buf.frames())
        assert out == frames and buf.pending() == 0
    finally:
        a.close()
        b.close()


def test_sole_data_takes_exactly_one_whole_data_frame_or_nothing():
    def loaded(wire):
        buf = FrameBuffer()
        buf.writable()[:len(wire)] = wire
        buf.filled(len(wire))
        return buf

    one = protocol.encode(DATA, 7, b"hello")
    buf = loaded(one)
    client_id, payload = buf.sole_data()
    assert (client_id, bytes(payload)) == (7, b"hello") and buf.pending() == 0
    # Anything else is left whole for frames(): two frames, a partial one, a CLOSE.
    for wire in (one + one, one + one[:3], one[:-1], protocol.encode(CLOSE, 7), b"\x00"):
        buf = loaded(wire)
        assert buf.sole_data() is None
        assert buf.pending() == len(wire)
    buf = loaded(one + one)
    assert [(i, bytes(p)) for _, i, p in buf.frames()] == [(7, b"hello"), (7, b"hello")]


def test_pages_go_back_only_after_enough_small_reads():
    # Private anonymous pages read as zeros once given back (MADV_DONTNEED).
    from tcprc.engine import buffers
    mapping = buffers.anonymous(4 * buffers.KEEP)
    pages = buffers.Pages(mapping)
    mapping[buffers.KEEP:buffers.KEEP + 3] = b"abc"
    mapping[0:3] = b"xyz"
    pages.note(2 * buffers.KEEP)
    assert pages.wide
    for _ in range(buffers.QUIET_READS - 1):
        pages.note(100)
    assert pages.wide and mapping[buffers.KEEP:buffers.KEEP + 3] == b"abc"
    pages.note(2 * buffers.KEEP)          # a big read again: the count starts over
    for _ in range(buffers.QUIET_READS - 1):
        pages.note(100)
    assert mapping[buffers.KEEP:buffers.KEEP + 3] == b"abc"
    pages.note(100)
    assert not pages.wide
    assert mapping[buffers.KEEP:buffers.KEEP + 3] == b"\0\0\0"   # given back
    assert mapping[0:3] == b"xyz"                                 # the first KEEP bytes stay
