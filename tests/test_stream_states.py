"""Streams walk named states (open, draining, shut, released), seen on a real device link."""

import socket
import threading

from support.net import recv_exactly, tcp_pair
from support.peers import RawPeer
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.device.link import open_device_link
from tcprc.engine import stream as states
from tcprc.wire import frames
from tcprc.wire.frames import CLOSE, CONNECT, DATA


class _Target:
    """A local service that accepts one client and reads only when told."""

    def __init__(self):
        self.listener = socket.socket()
        # Inherited by the accepted client: it takes little before the device queues.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = self.listener.getsockname()
        self.client = None

    def accept(self):
        self.listener.settimeout(10)
        self.client, _ = self.listener.accept()
        self.client.settimeout(10)
        return self.client

    def close(self):
        for s in (self.listener, self.client):
            if s is not None:
                s.close()


def _start_link(target):
    uplink, far = tcp_pair()
    link = open_device_link(uplink, settings("device", local="%s:%d" % target.address,
                                             stream_buffer=16 << 20),
                            "test uplink", target.address, set())
    thread = threading.Thread(target=link.run, daemon=True)
    thread.start()
    peer = RawPeer(far)
    peer.expect(frames.encode(frames.LISTEN, 0))
    return link, peer


def _stream(link, client_id):
    for stream in list(link.streams.values()) + list(link.retiring):
        if stream.id == client_id:
            return stream
    return None


def _connected(link, peer, target, client_id):
    """CONNECT `client_id` to `target`; (its stream once connected, the target's socket)."""
    peer.send(CONNECT, client_id, frames.encode_connect_payload("", 0))
    client = target.accept()
    stream = wait_for(lambda: _stream(link, client_id), what="the stream")
    wait_for(lambda: stream.sock is not None, what="the stream to connect")
    return stream, client


def test_a_stream_closed_by_the_peer_drains_then_shuts_then_is_released():
    target = _Target()
    link, peer = _start_link(target)
    try:
        stream, client = _connected(link, peer, target, 1)
        assert stream.state == states.OPEN
        # More than the client's socket takes at once, then the peer's CLOSE
        # (sent by a thread: the link may pause reading until the client reads).
        payload = bytes(range(256)) * 256 * 160     # 10 MB, under stream_buffer

        def send_all():
            for start in range(0, len(payload), frames.MAX_PAYLOAD):
                peer.send(DATA, 1, payload[start:start + frames.MAX_PAYLOAD])
            peer.send(CLOSE, 1)
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        wait_for(lambda: stream.state == states.DRAINING, what="draining")
        assert stream in link.retiring and 1 not in link.streams
        assert recv_exactly(client, len(payload)) == payload
        sender.join(10)
        wait_for(lambda: stream.state == states.SHUT, what="shut after the drain")
        assert client.recv(1) == b""                 # the write half was shut: EOF
        client.close()
        wait_for(lambda: stream.state == states.RELEASED, what="released once the pump ended")
        wait_for(lambda: not link.retiring, what="the retiring set to empty")
        assert stream.pump_done and stream.sock.fileno() == -1
        peer.nothing_for(0.2)                        # the peer's CLOSE is not answered
    finally:
        link.stop("test over")
        assert link.wait_stopped(10)
        peer.close()
        target.close()


def test_a_stream_cut_by_this_side_goes_straight_to_shut_and_is_released():
    target = _Target()
    link, peer = _start_link(target)
    try:
        old, client = _connected(link, peer, target, 2)
        # A CONNECT on the busy id replaces the stream: the old one is cut, no CLOSE.
        peer.send(CONNECT, 2, frames.encode_connect_payload("", 0))
        target.listener.settimeout(10)
        second, _ = target.listener.accept()
        wait_for(lambda: old.state == states.RELEASED, what="the old stream released")
        assert client.recv(1) == b""
        assert link.streams[2] is not old and link.streams[2].state == states.OPEN
        second.close()
        assert peer.read_frame() == (CLOSE, 2, b"")   # the new stream's own end
        wait_for(lambda: not link.streams and not link.retiring, what="all released")
    finally:
        link.stop("test over")
        assert link.wait_stopped(10)
        peer.close()
        target.close()
