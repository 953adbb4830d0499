"""The wire layer without I/O: the decoder over a buffer the caller owns, DATA splitting."""

import subprocess
import sys

import pytest

from support import ROOT
from tcprc.wire import frames
from tcprc.wire.frames import CLOSE, DATA, FrameDecoder


def test_the_decoder_works_over_a_plain_bytearray_fed_byte_by_byte():
    decoder = FrameDecoder(bytearray(frames.HEADER_SIZE + frames.MAX_PAYLOAD))
    wire = frames.encode(DATA, 3, b"hello") + frames.encode(CLOSE, 3)
    got = []
    for n in range(len(wire)):
        decoder.feed(wire[n:n + 1])
        got.extend((c, i, bytes(p)) for c, i, p in decoder.frames())
    assert got == [(DATA, 3, b"hello"), (CLOSE, 3, b"")]
    assert decoder.pending() == 0


def test_the_caller_fills_the_writable_view_and_reports_the_count():
    buf = bytearray(2 * (frames.HEADER_SIZE + frames.MAX_PAYLOAD))
    decoder = FrameDecoder(buf)
    frame = frames.encode(DATA, 9, b"x" * 1000)
    view = decoder.writable()
    view[:len(frame) - 10] = frame[:-10]
    decoder.filled(len(frame) - 10)
    assert decoder.sole_data() is None and decoder.incomplete_frame() == \
        "DATA frame for client 9 with 990 of 1000 payload bytes"
    view = decoder.writable()
    view[:10] = frame[-10:]
    decoder.filled(10)
    client_id, payload = decoder.sole_data()
    assert client_id == 9 and bytes(payload) == b"x" * 1000


def test_a_buffer_too_small_for_one_frame_is_refused():
    with pytest.raises(ValueError):
        FrameDecoder(bytearray(1000))


def test_data_over_the_frame_limit_splits_into_frames():
    data = bytes(range(256)) * 600          # 153600 bytes: 3 frames
    parts, size = frames.data_frames(4, memoryview(data))
    assert len(parts) == 6 and size == len(data) + 3 * frames.HEADER_SIZE
    decoder = FrameDecoder(bytearray(size + frames.MAX_PAYLOAD))
    decoder.feed(b"".join(bytes(p) for p in parts))
    got = [(c, i, bytes(p)) for c, i, p in decoder.frames()]
    assert [len(p) for _, _, p in got] == [frames.MAX_PAYLOAD, frames.MAX_PAYLOAD,
                                          len(data) - 2 * frames.MAX_PAYLOAD]
    assert b"".join(p for _, _, p in got) == data and {(c, i) for c, i, _ in got} == {(DATA, 4)}


def test_the_wire_package_imports_no_io_module():
    code = ("import sys; import tcprc.wire.frames, tcprc.wire.session\n"
            "bad = {'socket', 'select', 'selectors', 'threading', 'mmap', 'ssl'} & set(sys.modules)\n"
            "print(sorted(m for m in sys.modules if m.startswith('tcprc.')), sorted(bad))")
    # -S -I: no site hooks or environment that would import I/O modules on their own.
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("['tcprc.errors', 'tcprc.wire', 'tcprc.wire.actions', "
                                  "'tcprc.wire.frames', 'tcprc.wire.heartbeat', "
                                  "'tcprc.wire.session', 'tcprc.wire.states', "
                                  "'tcprc.wire.streams'] []")


def test_protocol_errors_are_the_peers_fault():
    from tcprc.errors import PeerError, TcprcError
    assert issubclass(frames.ProtocolError, PeerError) and issubclass(PeerError, TcprcError)
