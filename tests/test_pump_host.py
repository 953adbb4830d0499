"""A pump talks to a small PumpHost, never to Link: driven here with no loop and no link."""

import socket
import threading
from typing import Any, Callable, List, Tuple

from support.fresh import python_output
from support.net import recv_exactly
from support.waiting import wait_for
from tcprc.engine.pump import PumpHost, PumpThread, run_pump
from tcprc.engine.stream import Stream
from tcprc.engine.writer import FrameWriter
from tcprc.wire import frames


class RecordingHost(PumpHost):
    """Runs what the pump schedules at once, in the pump's thread, and records it."""

    def __init__(self) -> None:
        self.open_streams: List[Stream] = []
        self.events: List[Tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def call_soon(self, callback: Callable[[], Any]) -> None:
        callback()

    def stream_connected(self, stream: Stream) -> None:
        with self.lock:
            self.events.append(("connected", stream.id, stream.take_connected() is not None))

    def pump_exited(self, stream: Stream, reason: str) -> None:
        with self.lock:
            self.events.append(("exited", stream.id, reason))

    def uplink_failed(self, reason: str) -> None:
        with self.lock:
            self.events.append(("uplink failed", reason))


def _frame(sock: socket.socket) -> Tuple[int, int, bytes]:
    length, command, client_id = frames.HEADER.unpack(recv_exactly(sock, frames.HEADER_SIZE))
    return command, client_id, recv_exactly(sock, length)


def test_a_pump_copies_to_frames_and_says_it_exited_without_a_link():
    uplink, far = socket.socketpair()
    local, client = socket.socketpair()
    host = RecordingHost()
    stream = Stream(4, "test")
    stream.sock = local
    host.open_streams.append(stream)
    try:
        thread = PumpThread("p", run_pump, (stream, FrameWriter(uplink), host, None))
        client.sendall(b"hello")
        assert _frame(far) == (frames.DATA, 4, b"hello")
        client.shutdown(socket.SHUT_WR)
        assert _frame(far) == (frames.CLOSE, 4, b"")
        assert thread.join(10)
        assert host.events == [("exited", 4, "closed")]
        assert stream.bytes_to_peer == 5
    finally:
        for s in (uplink, far, local, client):
            s.close()


def test_a_connecting_pump_hands_its_socket_over_through_the_host():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    uplink, far = socket.socketpair()
    host = RecordingHost()
    stream = Stream(9, "svc")
    try:
        thread = PumpThread("p", run_pump, (stream, FrameWriter(uplink), host,
                                            ("127.0.0.1", listener.getsockname()[1], 5.0)))
        service, _ = listener.accept()
        wait_for(lambda: host.events, what="the connected event")
        assert host.events == [("connected", 9, True)]
        service.sendall(b"banner")
        assert _frame(far) == (frames.DATA, 9, b"banner")
        service.close()
        assert _frame(far) == (frames.CLOSE, 9, b"")
        assert thread.join(10)
        assert host.events[1] == ("exited", 9, "closed")
    finally:
        for s in (listener, uplink, far):
            s.close()


def test_a_failed_uplink_send_is_reported_to_the_host():
    uplink, far = socket.socketpair()
    local, client = socket.socketpair()
    host = RecordingHost()
    stream = Stream(2, "test")
    stream.sock = local
    far.close()   # sends to the uplink now fail with EPIPE
    try:
        thread = PumpThread("p", run_pump, (stream, FrameWriter(uplink), host, None))
        client.sendall(b"x")
        assert thread.join(10)
        assert host.events[0][0] == "uplink failed" and "uplink write failed" in host.events[0][1]
        assert host.events[1] == ("exited", 2, "uplink closed")
    finally:
        for s in (uplink, local, client):
            s.close()


def test_the_pump_module_does_not_import_the_link():
    code = "import sys, tcprc.engine.pump; print('tcprc.engine.link' in sys.modules)"
    assert python_output(code, timeout=30).strip() == "False"
