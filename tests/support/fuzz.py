"""Fuzz targets with a seeded random.Random (no hypothesis): one place for
tests/test_fuzz.py (fixed seed, small budget) and scripts/fuzz (long runs).
Legacy: the frame decoder, CONNECT payloads, both link roles; protocol v2:
the handshake state machines (real HELLO/CHALLENGE/AUTH/WELCOME payloads
changed where their structure is) and both link roles after a genuine,
changed or out-of-order handshake (CREDIT/EOF/PING/PONG/CLOSE with reasons);
and the console, the command parser and the config loader.

A target is a class with make(rng) -> an input, and check(input), which
raises AssertionError (or anything else) when a property breaks.  Inputs
are plain data (bytes, str, lists), so a failing one can be written out
with repr() and replayed.  Properties, for every target: no exception
escapes but the documented ones, no thread dies (threading.excepthook is
watched), a link ends at most itself, and memory stays bounded.
"""

import errno
import os
import random
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from tcprc.wire import frames as wire
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN

from . import ROOT

KNOWN = (CONNECT, CLOSE, DATA, LISTEN)


# ---- thread deaths ------------------------------------------------------------------
class ThreadDeaths:
    """Collects exceptions that end any thread while installed."""

    def __init__(self) -> None:
        self.deaths: List[str] = []
        self._old: Any = None

    def __enter__(self) -> "ThreadDeaths":
        self._old = threading.excepthook

        def hook(args: Any) -> None:
            self.deaths.append("%s in %s: %s" % (args.exc_type.__name__,
                                                 getattr(args.thread, "name", "?"), args.exc_value))
        threading.excepthook = hook
        return self

    def __exit__(self, *exc: Any) -> None:
        threading.excepthook = self._old


def _bytes(rng: random.Random, count: int) -> bytes:
    """Random bytes from `rng` (not os.urandom: a seed must replay its inputs)."""
    return rng.getrandbits(8 * count).to_bytes(count, "big") if count else b""


# ---- frames --------------------------------------------------------------------------
def reference_frames(data: bytes) -> Tuple[List[Tuple[int, int, bytes]], int]:
    """The frames in `data` by the protocol's definition, and the bytes left over."""
    out, i = [], 0
    while len(data) - i >= 4:
        length, command, client_id = struct.unpack_from("!HBB", data, i)
        if len(data) - i - 4 < length:
            break
        out.append((command, client_id, data[i + 4:i + 4 + length]))
        i += 4 + length
    return out, len(data) - i


def random_frames(rng: random.Random, count: int, ids: int = 128,
                  big: bool = True) -> List[Tuple[int, int, bytes]]:
    frames = []
    for _ in range(count):
        command = rng.choice(KNOWN + KNOWN + (0, 5, 9, 13, 14, 255))
        size = rng.choice((0, 0, 1, 3, 4, 7, 64, 300, 1400) + ((65535, 40000) if big else ()))
        frames.append((command, rng.randrange(ids), _bytes(rng, size)))
    return frames


def mutate_wire(rng: random.Random, frames: List[Tuple[int, int, bytes]]) -> bytes:
    """Valid headers, then some lengths made wrong, bytes flipped, cut or garbage added."""
    out = bytearray()
    for command, client_id, payload in frames:
        length = len(payload)
        if rng.random() < 0.2:
            length = max(0, min(0xFFFF, length + rng.choice((-5, -1, 1, 3, 100, 65535))))
        out += struct.pack("!HBB", length, command, client_id) + payload
    for _ in range(rng.choice((0, 0, 1, 3))):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    if out and rng.random() < 0.3:
        del out[rng.randrange(len(out)):]
    if rng.random() < 0.2:
        out += _bytes(rng, rng.randrange(1, 9))
    return bytes(out)


def connect_payload(rng: random.Random, target: Tuple[str, int]) -> bytes:
    """A CONNECT payload: valid (often the target), or with a wrong length or bad bytes.

    Addresses are IP literals, loopback names or garbage: never a name that
    would need DNS (a fuzz run must not depend on the network)."""
    address = rng.choice(("", target[0], "127.0.0.1", "::1", "localhost", "10.%d.0.1" % rng.randrange(256),
                          "0.0.0.0", "\x00\x01", "é", "a b", "1.2.3.4\n"))
    port = rng.choice((target[1], 23, 0, 1, 65535, rng.randrange(65536)))
    raw = address.encode("utf-8")
    payload = struct.pack("!H", len(raw)) + raw + struct.pack("!H", port)
    roll = rng.random()
    if roll < 0.15:
        payload = payload[:rng.randrange(len(payload))]
    elif roll < 0.25:
        payload = struct.pack("!H", rng.randrange(65536)) + payload[2:]
    elif roll < 0.3:
        payload += _bytes(rng, 3)
    return payload


class Decoder:
    """FrameDecoder over random and structure-aware streams, in random read sizes:
    it yields exactly the reference frames, and its buffer never grows."""
    name = "decoder"

    def make(self, rng: random.Random) -> Any:
        if rng.random() < 0.3:
            data = _bytes(rng, rng.randrange(0, 3000))
        else:
            data = mutate_wire(rng, random_frames(rng, rng.randrange(1, 12)))
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 8)))
        return [data, cuts, rng.random() < 0.5]

    @staticmethod
    def decode(data: bytes, cuts: List[int], sole: bool) -> Tuple[List[Any], int]:
        buf = bytearray(wire.HEADER_SIZE + wire.MAX_PAYLOAD)
        decoder = wire.FrameDecoder(buf)
        out: List[Any] = []
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        for piece in pieces:
            view = memoryview(piece)
            while view:
                free = decoder.writable()
                assert len(free), "the decoder has no room after its frames were taken"
                count = min(len(free), len(view))
                free[:count] = view[:count]
                decoder.filled(count)
                view = view[count:]
                if sole:
                    one = decoder.sole_data()
                    if one is not None:
                        out.append((DATA, one[0], bytes(one[1])))
                out.extend((c, i, bytes(p)) for c, i, p in decoder.frames())
                assert len(buf) == wire.HEADER_SIZE + wire.MAX_PAYLOAD, "the buffer grew"
                assert decoder.pending() < len(buf)
        decoder.incomplete_frame()
        return out, decoder.pending()

    def check(self, case: Any) -> None:
        data, cuts, sole = case
        assert self.decode(data, cuts, sole) == reference_frames(data)


class DecoderEverySplit(Decoder):
    """Small streams split in two at every byte."""
    name = "decoder-split"

    def make(self, rng: random.Random) -> Any:
        return mutate_wire(rng, random_frames(rng, rng.randrange(1, 6), big=False))[:400]

    def check(self, data: Any) -> None:
        want = reference_frames(data)
        for cut in range(len(data) + 1):
            assert self.decode(data, [cut], cut % 2 == 0) == want, "split at %d" % cut


class ConnectPayload:
    """decode_connect_payload: an (ASCII address, port) or ProtocolError, nothing else."""
    name = "connect-payload"

    def make(self, rng: random.Random) -> Any:
        if rng.random() < 0.5:
            return _bytes(rng, rng.randrange(0, 40))
        return connect_payload(rng, ("127.0.0.1", 2323))

    def check(self, payload: Any) -> None:
        try:
            address, port = wire.decode_connect_payload(payload)
        except wire.ProtocolError:
            return
        assert address.isascii() and address.isprintable() and " " not in address
        assert 0 <= port <= 65535


# ---- links over real sockets ----------------------------------------------------------
def _tcp_pair() -> Tuple[socket.socket, socket.socket]:
    # Hundreds of inputs a second leave tens of thousands of TIME_WAIT sockets in a
    # long run: when the ephemeral ports run out, wait for some (bounded), as the
    # harness's own want, not the target's failure.
    for attempt in range(240):
        try:
            listener = socket.socket()
            try:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                near = socket.create_connection(listener.getsockname())
                far, _ = listener.accept()
                return near, far
            finally:
                listener.close()
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or attempt == 239:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _read_frames_until(sock: socket.socket, want: Callable[[Tuple[int, int, bytes]], bool],
                       deadline: float) -> bool:
    """Read frames from `sock` until one satisfies `want`; False on EOF or timeout."""
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            return False
        if not chunk:
            return False
        buf += chunk
        frames, left = reference_frames(buf)
        if any(want(f) for f in frames):
            return True
        buf = buf[len(buf) - left:]
    return False


def _uplink_closed_after_eof(uplink: socket.socket, blob: bytes,
                             first: Optional[Callable[[], None]] = None) -> None:
    """first(), then `blob` and EOF on `uplink`: the app must close it within 10 s.
    A socket error (the app reset it) ends the check quietly; a timeout fails it."""
    try:
        if first is not None:
            first()
        uplink.sendall(blob)
        uplink.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while uplink.recv(65536) and time.monotonic() < deadline:
            pass
        assert time.monotonic() < deadline, "the uplink was not closed after its EOF"
    except socket.timeout:
        raise AssertionError("the uplink was not closed after its EOF") from None
    except OSError:
        pass
    finally:
        uplink.close()


def _client_bytes_reach(device: socket.socket, host: Tuple[str, int]) -> None:
    """A client of `host` sends b"hello": it must reach `device` as DATA."""
    client = socket.create_connection(host, timeout=5)
    try:
        client.sendall(b"hello")
        assert _read_frames_until(device, lambda f: f[0] == DATA and f[2] == b"hello",
                                  time.monotonic() + 10), "a client's bytes did not arrive"
    finally:
        client.close()


def _link_gone(app: Any) -> None:
    """The device left: within 10 s the app holds no link."""
    deadline = time.monotonic() + 10
    while app.status()["state"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.status()["state"] == "waiting", "the device left but its link stayed"


class EchoTarget:
    """The device's service: echoes, one thread per connection."""

    def __init__(self) -> None:
        from .services import Service
        self.service = Service("echo")
        self.address = self.service.address

    def close(self) -> None:
        self.service.close()


class DeviceLinkTarget:
    """A real DeviceLink (legacy DeviceSession) over TCP on 127.0.0.1, fed fuzzed frames.

    Afterwards the link either ended (with a reason) or still serves a fresh
    stream (CONNECT id 255, DATA echoed back); then it ends when the peer goes."""
    name = "device-link"
    PROBE = 255

    def __init__(self) -> None:
        self.target: Optional[EchoTarget] = None

    def make(self, rng: random.Random) -> Any:
        if self.target is None:
            self.target = EchoTarget()
        frames = []
        for command, client_id, payload in random_frames(rng, rng.randrange(1, 25), big=False):
            if command == CONNECT and rng.random() < 0.8:
                payload = connect_payload(rng, self.target.address)
            frames.append((command, client_id, payload))
        return mutate_wire(rng, frames) if rng.random() < 0.3 else \
            b"".join(wire.encode(*f) for f in frames)

    def check(self, blob: Any) -> None:
        from tcprc.device.link import open_device_link
        from .tunnel import settings
        if self.target is None:
            self.target = EchoTarget()
        address = self.target.address
        frames, left = reference_frames(blob)
        # A stream cut inside a frame waits for the rest of it, for ever: no probe then.
        used = {f[1] for f in frames}
        probe = None if left else next((i for i in range(255, 127, -1) if i not in used), None)
        near, far = _tcp_pair()
        link = open_device_link(near, settings("device", local="%s:%d" % address,
                                               connect_timeout=2.0), "fuzz uplink", address, set())
        thread = threading.Thread(target=link.run, name="fuzz-device-link", daemon=True)
        with ThreadDeaths() as deaths:
            thread.start()
            try:
                far.settimeout(5)
                assert far.recv(4) == wire.encode(LISTEN, 0)
                try:
                    far.sendall(blob)
                    if probe is not None:
                        far.sendall(wire.encode(CONNECT, probe, wire.encode_connect_payload("", 0)) +
                                    wire.encode(DATA, probe, b"probe"))
                except OSError:
                    pass   # the link ended on the blob: allowed, checked below
                if probe is not None:
                    echoed = _read_frames_until(far, lambda f: f[:2] == (DATA, probe) and b"probe" in f[2],
                                                time.monotonic() + 10)
                    assert echoed or link.wait_stopped(5) and link.end_reason, \
                        "the link neither served a fresh stream nor ended"
            finally:
                far.close()
                assert link.wait_stopped(15), "the link did not end after its peer left"
                thread.join(5)
            assert not thread.is_alive()
            assert not link.streams and not link.retiring, "streams left after teardown"
            assert not deaths.deaths, deaths.deaths

    def close(self) -> None:
        if self.target is not None:
            self.target.close()


class ServerLinkTarget:
    """A real ServerApp: each input is an uplink that sends fuzzed frames (after
    LISTEN, mostly); afterwards the app still gives the tunnel to a fresh
    device, carries a client's bytes to it, and holds no link it should not."""
    name = "server-link"

    def __init__(self) -> None:
        self.app: Any = None

    def _app(self) -> Any:
        if self.app is None:
            from tcprc.server.app import ServerApp
            from .tunnel import settings
            self.app = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:0",
                                          listen_timeout=2.0, max_pending_per_source=64))
            self.app.start()
        return self.app

    def make(self, rng: random.Random) -> Any:
        frames = random_frames(rng, rng.randrange(1, 25), big=False)
        blob = mutate_wire(rng, frames) if rng.random() < 0.3 else \
            b"".join(wire.encode(*f) for f in frames)
        return (wire.encode(LISTEN, 0) if rng.random() < 0.85 else b"") + blob

    def check(self, blob: Any) -> None:
        app = self._app()
        with ThreadDeaths() as deaths:
            # Its link must end (on our EOF at the latest) before the next device
            # comes: a LISTEN read later would take the tunnel over from it.
            _uplink_closed_after_eof(socket.create_connection(app.listen_address, timeout=5), blob)
            device = socket.create_connection(app.listen_address, timeout=5)
            try:
                device.sendall(wire.encode(LISTEN, 0))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    shared = {row["id"]: row for row in app.devices()}.get(":legacy", {})
                    if shared.get("state") == "up" and shared["source"].endswith(
                            ":%d" % device.getsockname()[1]) and app.host_address:
                        break
                    time.sleep(0.01)
                else:
                    raise AssertionError("a fresh device did not get the tunnel")
                _client_bytes_reach(device, app.host_address)
            finally:
                device.close()
            _link_gone(app)
            assert not deaths.deaths, deaths.deaths

    def close(self) -> None:
        if self.app is not None:
            self.app.close()


# ---- protocol v2: the handshake and both link roles -------------------------------------
V2_ID, V2_SECRET = "gw1", b"fuzz-secret-0123456789abcdef"   # a test secret, not a real one
V2_HANDSHAKE = (wire.OFFER, wire.HELLO, wire.CHALLENGE, wire.AUTH, wire.WELCOME, wire.REJECT)


def _text_bytes(rng: random.Random) -> bytes:
    return rng.choice((b"", b"bye", "é".encode(), b"\xff\xfe", b"x" * 200, b"y" * 201, b"a\nb", b"\x00"))


def v2_payload(rng: random.Random, command: int) -> bytes:
    """A payload for a v2 frame: mostly well formed, sometimes just off."""
    odd = rng.random() < 0.3
    if command == wire.CREDIT:
        amount = rng.choice((1, 4096, 1 << 18, wire.MAX_CREDIT, 0, wire.MAX_CREDIT + 1, 0xFFFFFFFF)) \
            if odd else rng.randrange(1, 1 << 20)
        raw = struct.pack("!I", amount)
        return raw[:rng.randrange(4)] if odd and rng.random() < 0.3 else raw
    if command == wire.EOF:
        return _bytes(rng, rng.randrange(1, 4)) if odd else b""
    if command in (wire.PING, wire.PONG):
        return _bytes(rng, rng.choice((0, 7, 9, 64))) if odd else _bytes(rng, 8)
    if command == CLOSE:
        if not odd and rng.random() < 0.3:
            return b""
        reason = rng.randrange(256) if odd else rng.randrange(7)
        return bytes((reason,)) + _text_bytes(rng)
    if command == wire.REJECT:
        return bytes((rng.randrange(256),)) + _text_bytes(rng) if not odd or rng.random() < 0.5 else b""
    if command == DATA:
        return _bytes(rng, rng.choice((0, 1, 100, 1400, 16385, 40000)))
    return _bytes(rng, rng.choice((0, 1, 8, 40, 300)))


def v2_frames(rng: random.Random, count: int, target: Tuple[str, int], ids: int = 64) -> List[Tuple[int, int, bytes]]:
    """Stream frames of a v2 session (CONNECT, DATA, CLOSE with reasons, CREDIT, EOF,
    PING, PONG), handshake frames out of place, unknown commands; ids mostly few."""
    frames = []
    streams = (CONNECT, DATA, DATA, CLOSE, wire.CREDIT, wire.EOF, wire.PING, wire.PONG)
    for _ in range(count):
        command = rng.choice(streams * 4 + V2_HANDSHAKE + (LISTEN, 0, 15, 255))
        client_id = rng.randrange(4) if rng.random() < 0.7 else rng.randrange(ids)
        if command in (wire.PING, wire.PONG) or command in V2_HANDSHAKE:
            client_id = 0 if rng.random() < 0.9 else client_id
        payload = connect_payload(rng, target) if command == CONNECT else v2_payload(rng, command)
        frames.append((command, client_id, payload))
    return frames


def mutate_payload(rng: random.Random, payload: bytes) -> bytes:
    """A handshake payload changed where its structure is: one byte (version,
    flags, a length, the nonce, the window, the proof, the id), cut, grown."""
    out = bytearray(payload)
    roll = rng.random()
    if roll < 0.45 and out:
        i = rng.randrange(len(out)) if rng.random() < 0.5 else rng.choice(
            [0, 1, 34, 35, 36, 37, 38, len(out) - 1]) % len(out)
        out[i] = (out[i] + rng.choice((1, 255, 128))) & 0xFF if rng.random() < 0.7 else rng.randrange(256)
    elif roll < 0.6:
        del out[rng.randrange(len(out) + 1):]
    elif roll < 0.7:
        out += _bytes(rng, rng.choice((1, 2, 32)))
    elif roll < 0.8 and len(out) >= 2:
        # the window (bytes 34..37 of HELLO, 33..36 of CHALLENGE) at its edges
        at = 34 if len(out) >= 39 else 33
        out[at:at + 4] = struct.pack("!I", rng.choice((0, 1, wire.MAX_CREDIT, wire.MAX_CREDIT + 1)))
        del out[len(payload):]
    else:
        out[0:1] = bytes((rng.choice((0, 1, 3, 255)),)) if out else b"\x02"
    return bytes(out)


class Handshake:
    """DeviceHandshake and ServerHandshake on real HELLO/CHALLENGE/AUTH/WELCOME
    payloads with one or more changed (structure-aware) or out of order: each
    step answers or raises HandshakeError (a REJECT code, one line, no secret);
    a side accepts only what the secret proves: the server authenticates the
    id only on the genuine HELLO and AUTH, the device accepts a WELCOME only
    over the genuine CHALLENGE with the genuine proof."""
    name = "handshake"

    def make(self, rng: random.Random) -> Any:
        nonces = [_bytes(rng, wire.NONCE_SIZE), _bytes(rng, wire.NONCE_SIZE)]
        device_id = rng.choice((V2_ID, V2_ID, "", "other"))
        mutate = [m for m in ("hello", "challenge", "auth", "welcome") if rng.random() < 0.35]
        order = None
        if rng.random() < 0.15:
            order = [rng.choice(("hello", "challenge", "auth", "welcome")) for _ in range(rng.randrange(1, 6))]
        return [nonces, device_id, mutate, [rng.getrandbits(32) for _ in mutate], order,
                rng.choice((True, False))]

    def check(self, case: Any) -> None:
        from tcprc.wire.handshake import DeviceHandshake, HandshakeError
        from tcprc.wire.server_handshake import ServerHandshake
        nonces, device_id, mutate, seeds, order, legacy = case
        secrets = {V2_ID: V2_SECRET}
        device = DeviceHandshake(device_id, secrets.get(device_id) or (V2_SECRET if device_id else None),
                                 1 << 18, nonce=nonces[0])
        server = ServerHandshake(secrets.get, 1 << 18, legacy_allowed=legacy, nonce=nonces[1])
        changed = dict(zip(mutate, (random.Random(s) for s in seeds)))
        secret_text = V2_SECRET.decode()

        def step(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except HandshakeError as exc:
                assert exc.code in wire.REJECT_CODES, exc.code
                for text in (str(exc), exc.wire_text):
                    assert "\n" not in text and secret_text not in text
                    assert len(wire.clip_text(exc.wire_text)) <= wire.MAX_TEXT
                return exc

        def send(name: str, payload: bytes) -> bytes:
            if name in changed:
                payload = mutate_payload(changed[name], payload)
            return payload

        if order is not None:   # any sequence of calls: each answers or refuses, nothing else
            for name in order:
                if name == "hello":
                    step(device.hello)
                    step(lambda: server.on_hello(send("hello", device.hello())))
                elif name == "challenge":
                    step(lambda: device.on_challenge(send("challenge", wire.encode_challenge(nonces[1], 1 << 18))))
                elif name == "auth":
                    step(lambda: server.on_auth(send("auth", b"\x00")))
                else:
                    step(lambda: device.on_welcome(send("welcome", b"\x00\x00\x01x")))
            assert secret_text not in repr(device) + repr(server)
            return
        hello = device.hello()
        sent_hello = send("hello", hello)
        challenge = step(lambda: server.on_hello(sent_hello))
        if isinstance(challenge, Exception):
            return
        sent_challenge = send("challenge", challenge)
        auth = step(lambda: device.on_challenge(sent_challenge))
        if isinstance(auth, Exception):
            return
        sent_auth = send("auth", auth)
        if isinstance(step(lambda: server.on_auth(sent_auth)), Exception):
            return
        if server.authenticated:
            assert sent_hello == hello and sent_auth == auth and server.device_id == V2_ID, \
                "the server authenticated a changed HELLO or AUTH"
        welcome = server.welcome("127.0.0.1:2301")
        sent_welcome = send("welcome", welcome)
        host = step(lambda: device.on_welcome(sent_welcome))
        if isinstance(host, Exception):
            return
        if device_id:
            assert sent_challenge == challenge and sent_welcome[:33] == welcome[:33], \
                "the device accepted a WELCOME the secret does not prove"
        assert secret_text not in repr(device) + repr(server) + host


class _V2Server:
    """Plays a tcprc server on the far end of a device's uplink, by the book or not."""

    def __init__(self, far: socket.socket) -> None:
        from tcprc.wire.server_handshake import ServerHandshake
        self.far = far
        self.buf = b""
        self.handshake = ServerHandshake({V2_ID: V2_SECRET}.get, 1 << 18, legacy_allowed=True)

    def frame(self, deadline: float) -> Optional[Tuple[int, int, bytes]]:
        while True:
            frames, left = reference_frames(self.buf)
            if frames:
                first = frames[0]
                self.buf = self.buf[4 + len(first[2]):]
                return first
            self.far.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.far.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk


class DeviceLinkV2Target(DeviceLinkTarget):
    """A real DeviceLink with protocol = "v2", an id and a secret, over TCP.  The far
    end greets it as a server (CHALLENGE and WELCOME genuine, or changed, or
    out of order), then sends v2 stream frames, random and structure-aware.
    A changed CHALLENGE or WELCOME proof ends the link (never a session); after
    a genuine handshake the link ends or still serves a fresh stream; it
    ends when the peer goes; no stream, no thread is left."""
    name = "device-link-v2"

    def make(self, rng: random.Random) -> Any:
        if self.target is None:
            self.target = EchoTarget()
        greet = rng.choice(("genuine",) * 6 + ("challenge", "welcome", "order"))
        frames = v2_frames(rng, rng.randrange(1, 25), self.target.address)
        blob = mutate_wire(rng, frames) if rng.random() < 0.25 else b"".join(wire.encode(*f) for f in frames)
        return [greet, rng.getrandbits(32), blob]

    def check(self, case: Any) -> None:
        from tcprc.device.link import open_device_link
        from .tunnel import settings
        greet, seed, blob = case
        if self.target is None:
            self.target = EchoTarget()
        address = self.target.address
        frames, left = reference_frames(blob)
        used = {f[1] for f in frames}
        probe = None if left else next((i for i in range(255, 127, -1) if i not in used), None)
        near, far = _tcp_pair()
        link = open_device_link(near, settings("device", local="%s:%d" % address, connect_timeout=2.0,
                                               protocol="v2", id=V2_ID, secret=V2_SECRET.decode()),
                                "fuzz uplink", address, set())
        thread = threading.Thread(target=link.run, name="fuzz-device-link-v2", daemon=True)
        peer = _V2Server(far)
        rng = random.Random(seed)
        with ThreadDeaths() as deaths:
            thread.start()
            try:
                deadline = time.monotonic() + 10
                assert peer.frame(deadline) == (LISTEN, 0, b"")
                far.sendall(wire.OFFER_FRAME)
                hello = peer.frame(deadline)
                assert hello is not None and hello[0] == wire.HELLO, hello
                challenge = peer.handshake.on_hello(hello[2])
                must_end = False
                if greet == "order":   # WELCOME first, or CHALLENGE twice, or AUTH's reply skipped
                    far.sendall(wire.encode(rng.choice((wire.WELCOME, wire.AUTH, wire.HELLO, wire.OFFER)), 0,
                                            rng.choice((challenge, b"", b"\x00\x00\x01x"))))
                    must_end = True
                else:
                    sent = mutate_payload(rng, challenge) if greet == "challenge" else challenge
                    must_end = sent != challenge
                    far.sendall(wire.encode(wire.CHALLENGE, 0, sent))
                    auth = peer.frame(deadline)
                    if auth is not None and auth[0] == wire.AUTH:
                        if sent == challenge:
                            peer.handshake.on_auth(auth[2])
                            welcome = peer.handshake.welcome("127.0.0.1:2301")
                        else:   # the device proved over the changed CHALLENGE: a server would refuse
                            welcome = wire.encode_welcome("127.0.0.1:2301", bytes(32))
                        sent_welcome = mutate_payload(rng, welcome) if greet == "welcome" else welcome
                        must_end = must_end or sent_welcome[:33] != welcome[:33]
                        far.sendall(wire.encode(wire.WELCOME, 0, sent_welcome))
                if must_end:
                    assert link.wait_stopped(10), "the device kept a session the secret does not prove"
                    assert link.end_reason
                try:
                    far.sendall(blob)
                    if probe is not None:
                        far.sendall(wire.encode(CONNECT, probe, wire.encode_connect_payload("", 0)) +
                                    wire.encode(DATA, probe, b"probe"))
                except OSError:
                    pass
                if probe is not None and not must_end:
                    echoed = _read_frames_until(far, lambda f: f[:2] == (DATA, probe) and b"probe" in f[2],
                                                time.monotonic() + 10)
                    assert echoed or link.wait_stopped(5) and link.end_reason, \
                        "the link neither served a fresh stream nor ended"
            finally:
                far.close()
                assert link.wait_stopped(15), "the link did not end after its peer left"
                thread.join(5)
            assert not thread.is_alive()
            assert not link.streams and not link.retiring, "streams left after teardown"
            assert not deaths.deaths, deaths.deaths


class ServerLinkV2Target:
    """A real ServerApp with one device table (gw1) and legacy sessions allowed.
    Each input is an uplink from its own 127.x.y.z that greets it as a v2 device
    (HELLO and AUTH genuine, changed or out of order), then sends v2 stream
    frames.  The id's host port goes only to a genuine HELLO and AUTH; the
    uplink is closed after its EOF; then a genuine device gets its port and a
    client's bytes reach it, and the app holds no link once it leaves."""
    name = "server-link-v2"

    def __init__(self) -> None:
        self.app: Any = None
        self.gw_host = ""

    def _app(self) -> Any:
        if self.app is None:
            from tcprc.server.app import ServerApp
            from .net import free_port
            from .tunnel import settings
            self.gw_host = "127.0.0.1:%d" % free_port()
            self.app = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:0", legacy=True,
                                          listen_timeout=2.0, max_pending_per_source=64,
                                          devices={V2_ID: {"secret": V2_SECRET.decode(), "host": self.gw_host}}))
            self.app.start()
        return self.app

    def make(self, rng: random.Random) -> Any:
        greet = rng.choice(("genuine",) * 4 + ("hello", "auth", "order", "anonymous"))
        frames = v2_frames(rng, rng.randrange(1, 25), ("127.0.0.1", 2323))
        blob = mutate_wire(rng, frames) if rng.random() < 0.25 else b"".join(wire.encode(*f) for f in frames)
        source = "127.%d.%d.%d" % (rng.randrange(1, 255), rng.randrange(256), rng.randrange(1, 255))
        return [greet, rng.getrandbits(32), source, blob]

    def _greet(self, uplink: socket.socket, greet: str, rng: random.Random) -> Optional[str]:
        """The handshake as `greet` says; the WELCOME's host, or None."""
        from tcprc.wire.handshake import DeviceHandshake
        peer = _V2Server(uplink)   # its frame reader
        deadline = time.monotonic() + 10
        uplink.sendall(wire.encode(LISTEN, 0))
        if peer.frame(deadline) != (wire.OFFER, 2, b""):
            return None
        device_id = "" if greet == "anonymous" else V2_ID
        handshake = DeviceHandshake(device_id, V2_SECRET if device_id else None, 1 << 18)
        hello = handshake.hello()
        if greet == "order":
            uplink.sendall(wire.encode(rng.choice((wire.AUTH, wire.WELCOME, wire.CHALLENGE)), 0,
                                       rng.choice((hello, b"\x00", b""))))
        sent_hello = mutate_payload(rng, hello) if greet == "hello" else hello
        uplink.sendall(wire.encode(wire.HELLO, 0, sent_hello))
        challenge = peer.frame(deadline)
        if challenge is None or challenge[0] != wire.CHALLENGE:
            return None
        try:
            auth = handshake.on_challenge(challenge[2])
        except Exception:
            return None
        sent_auth = mutate_payload(rng, auth) if greet == "auth" else auth
        uplink.sendall(wire.encode(wire.AUTH, 0, sent_auth))
        while True:
            answer = peer.frame(deadline)
            if answer is None or answer[0] == wire.REJECT:
                return None
            if answer[0] == wire.WELCOME:
                host = wire.decode_welcome(answer[2])[1]
                if host == self.gw_host:
                    assert greet != "order" and (sent_hello, sent_auth) == (hello, auth), \
                        "the id's port went to a changed handshake"
                return host

    def check(self, case: Any) -> None:
        greet, seed, source, blob = case
        app = self._app()
        rng = random.Random(seed)
        with ThreadDeaths() as deaths:
            uplink = socket.socket()

            def greet_first() -> None:
                uplink.bind((source, 0))
                uplink.settimeout(5)
                uplink.connect(app.listen_address)
                host = self._greet(uplink, greet, rng)
                if greet == "genuine":   # (a change that left the bytes as they were counts as one)
                    assert host == self.gw_host, "a genuine device did not get its port"
            _uplink_closed_after_eof(uplink, blob, greet_first)
            device = socket.create_connection(app.listen_address, timeout=5)
            try:
                assert self._greet(device, "genuine", rng) == self.gw_host, "a genuine device was refused"
                gw = self.gw_host.rsplit(":", 1)
                _client_bytes_reach(device, (gw[0], int(gw[1])))
            finally:
                device.close()
            _link_gone(app)
            assert not deaths.deaths, deaths.deaths

    def close(self) -> None:
        if self.app is not None:
            self.app.close()


# ---- console, commands, config -----------------------------------------------------------
class Console:
    """LineEditor: any bytes in any pieces; lines are bounded, the buffer too."""
    name = "console"
    MAX = 64

    def make(self, rng: random.Random) -> Any:
        alphabet = b"abc \t\r\n\x1b[OA\x08\x7f\x03\x15\xc3\xa9\x00\xff"
        size = rng.randrange(0, 400)
        data = bytes(rng.choice(alphabet) for _ in range(size)) if rng.random() < 0.7 \
            else _bytes(rng, size)
        return [data, sorted(rng.randrange(size + 1) for _ in range(rng.randrange(4)))]

    def check(self, case: Any) -> None:
        from tcprc.ops.console import LineEditor
        data, cuts = case
        editor = LineEditor(max_line=self.MAX)
        whole = LineEditor(max_line=self.MAX)
        lines: List[Any] = []
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            _, got = editor.feed(data[a:b])
            lines += got
            assert editor.pending() <= self.MAX
        for line in lines:
            assert line in (LineEditor.TOO_LONG, LineEditor.CANCELLED) or (
                isinstance(line, str) and len(line) <= self.MAX)
        assert whole.feed(data)[1] == lines, "pieces change the lines"


COMMAND_WORDS = ("TCPRemoteConnect", "tcpremotedisconnect", "status", "config", "help", "get", "set",
                 "save", "device.server", "device.local", "device.allow", "server.host", "log.level",
                 "console.echo", "device.keepalive_idle", "device", "server", "log", "1.2.3.4", "9000",
                 "", "\"\"", "'", "\"", "\\", "-1", "65536", "true", "nan", "1e309", "é", "\x00",
                 "a,b", "127.0.0.1:22", "::1", "[::1]:80", "localhost", "x" * 300)


class Commands:
    """CommandParser against real (unstarted) apps: every answer ends in OK or ERROR,
    and no line reaches the "internal error" net (that is a bug)."""
    name = "commands"

    def __init__(self) -> None:
        self.parsers: Dict[str, Any] = {}

    def make(self, rng: random.Random) -> Any:
        words = [rng.choice(COMMAND_WORDS) for _ in range(rng.randrange(0, 6))]
        if rng.random() < 0.2 and words:
            i = rng.randrange(len(words))
            words[i] = "".join(rng.choice("\"' \\abc.:,\t") for _ in range(rng.randrange(8)))
        return [rng.choice(("device", "server")), " ".join(words)]

    def _parser(self, role: str) -> Any:
        if role not in self.parsers:
            from tcprc.device.app import DeviceApp
            from tcprc.ops.commands import CommandParser
            from tcprc.ops.config import build_config
            from tcprc.server.app import ServerApp
            cfg = build_config(role, {}, "fuzz")
            app = DeviceApp(getattr(cfg, role)) if role == "device" else ServerApp(getattr(cfg, role))
            self.parsers[role] = CommandParser(app, cfg)
        return self.parsers[role]

    def check(self, case: Any) -> None:
        role, line = case
        answer = self._parser(role).execute(line)
        assert isinstance(answer, list) and all(isinstance(a, str) for a in answer)
        if answer:
            assert answer[-1] == "OK" or answer[-1].startswith("ERROR ")
            assert "internal error" not in answer[-1], answer[-1]
            assert all("\n" not in a for a in answer)


def _sample(role: str) -> str:
    name = "tcprc.toml" if role == "device" else "tcprc-server.toml"
    with open(os.path.join(ROOT, "etc", name)) as handle:
        return handle.read()


def _odd_value(rng: random.Random) -> Any:
    return rng.choice((0, -1, 2 ** 70, 1.5, float("nan"), float("inf"), True, "", "x" * 2000,
                       "127.0.0.1:0", "\x00", [], [1, "a"], ["10.0.0.0/8"], {"a": 1}, [{}],
                       "0.0.0.0/0", "/tmp/x", "debug"))


class ConfigText:
    """load_config on random TOML-ish text and on mutations of etc/*.toml (text
    and parsed values): a Config or one ConfigError line, nothing else."""
    name = "config"

    def make(self, rng: random.Random) -> Any:
        role = rng.choice(("device", "server"))
        lines = _sample(role).splitlines()
        roll = rng.random()
        if roll < 0.4:   # text: drop, repeat, cut or garble lines
            for _ in range(rng.randrange(1, 6)):
                i = rng.randrange(len(lines))
                action = rng.randrange(4)
                if action == 0:
                    del lines[i]
                elif action == 1:
                    lines.insert(i, lines[rng.randrange(len(lines))])
                elif action == 2:
                    lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
                else:
                    lines[i] += rng.choice(("]", "\"", " = ", "[x]", "\\", "\x00", "é", "=1", "[["))
            return ["text", role, "\n".join(lines)]
        if roll < 0.5:
            alphabet = "[]=\"'.,#\n abc123_-{}tfe"
            return ["text", role, "".join(rng.choice(alphabet) for _ in range(rng.randrange(200)))]
        # values: a key of the parsed sample (or an unknown one) gets an odd value
        from tcprc.ops.config import SCHEMA
        raw: Dict[str, Any] = {}
        for _ in range(rng.randrange(1, 4)):
            section = rng.choice(sorted(SCHEMA[role]) + ["nope"])
            keys = sorted(SCHEMA[role].get(section, {"k": None})) + ["unknown"]
            raw.setdefault(section, {})[rng.choice(keys)] = _odd_value(rng)
        if rng.random() < 0.1:
            raw[rng.choice(sorted(SCHEMA[role]))] = _odd_value(rng)
        return ["values", role, raw]

    def check(self, case: Any) -> None:
        from tcprc.errors import ConfigError
        from tcprc.ops.config import build_config, load_config
        kind, role, body = case
        try:
            if kind == "values":
                build_config(role, body, "fuzz")
                return
            fd, path = tempfile.mkstemp(suffix=".toml")
            try:
                with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as handle:
                    handle.write(body)
                load_config(path, role)
            finally:
                os.unlink(path)
        except ConfigError as exc:
            assert "\n" not in str(exc), "a config error of more than one line"


def _well_formed(command: int, payload: bytes) -> None:
    """Raises when a frame a core sent breaks the v2 format of its command."""
    assert command in wire.COMMAND_NAMES, "sent unknown command %d" % command
    if command == CLOSE:
        wire.decode_close_reason(payload)
    elif command == wire.CREDIT:
        wire.decode_credit(payload)
    elif command in (wire.PING, wire.PONG):
        wire.decode_ping(payload)
    elif command == wire.REJECT:
        wire.decode_reject(payload)
    elif command == CONNECT:
        wire.decode_connect_payload(payload)
    elif command in (wire.EOF, LISTEN, wire.OFFER):
        assert not payload, "%s with a payload" % wire.COMMAND_NAMES[command]


class CorePair:
    """The protocol core alone (wire.session and wire.streams, no socket, no
    thread): a device core and a server core after a genuine v2 handshake, one
    of them fed hostile frames (random and structure-aware, as the link
    targets' peers send) between conforming ones of a live stream.  Property:
    no exception escapes the core, the side that got them breaks no rule of its
    own (its answers decode), and unless it gave up on the uplink, a fresh
    stream still carries bytes both ways intact and closes with one CLOSE each way."""
    name = "core-pair"

    def make(self, rng: random.Random) -> Any:
        frames = v2_frames(rng, rng.randrange(1, 25), ("127.0.0.1", 1))
        blob = mutate_wire(rng, frames) if rng.random() < 0.25 else \
            b"".join(wire.encode(*f) for f in frames)
        return [rng.choice(("device", "server")), blob]

    def check(self, case: Any) -> None:
        from .core import Pair
        victim_name, blob = case
        pair = Pair(v2=True, window=64 * 1024)
        victim = pair.device if victim_name == "device" else pair.server
        live = pair.connect()
        pair.server.write(live, b"before")
        parsed, _ = reference_frames(blob)
        for frame in parsed:
            victim.receive(frame)
            for command, client_id, payload in victim.out:   # its answers are well formed
                _well_formed(command, payload)
            if victim.failed:
                return   # it gave up on the uplink: the property asks no more
        pair.flush()
        if victim.failed or (pair.device.failed or pair.server.failed):
            return
        pair.closes.clear()   # count only the fresh stream's CLOSEs
        fresh = pair.connect()
        pair.device.write(fresh, b"up" * 1000)
        pair.server.write(fresh, b"down" * 1000)
        pair.device.shut(fresh)
        pair.server.shut(fresh)
        for _ in range(20):
            pair.flush()
            for side in pair.sides():
                for cid in list(side.gone) + list(side.streams):
                    side.read(cid)
        assert pair.device.gone[fresh].read.endswith(b"down" * 1000)
        assert pair.server.gone[fresh].read.endswith(b"up" * 1000)
        assert pair.closes.get(("device", fresh)) == pair.closes.get(("server", fresh)) == 1


def targets() -> List[Any]:
    return [Decoder(), DecoderEverySplit(), ConnectPayload(), Console(), Commands(), ConfigText(),
            DeviceLinkTarget(), ServerLinkTarget(), Handshake(), DeviceLinkV2Target(), ServerLinkV2Target(),
            CorePair()]


class Outcome:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tried = 0
        self.failures: List[Tuple[Any, str]] = []


def run(target: Any, seed: int, seconds: float, max_inputs: Optional[int] = None,
        stop_on_failure: bool = False) -> Outcome:
    """Inputs for `target` from random.Random(seed) for `seconds` (or `max_inputs`)."""
    rng = random.Random("%s:%d" % (target.name, seed))
    outcome = Outcome(target.name)
    end = time.monotonic() + seconds
    while time.monotonic() < end and (max_inputs is None or outcome.tried < max_inputs):
        case = target.make(rng)
        outcome.tried += 1
        try:
            target.check(case)
        except Exception as exc:   # every failure is recorded with its input
            outcome.failures.append((case, "%s: %s" % (type(exc).__name__, exc)))
            if stop_on_failure:
                break
    return outcome
