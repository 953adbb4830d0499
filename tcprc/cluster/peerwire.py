"""The peer handshake between two servers of a cluster, without I/O: lines in,
lines out, PeerHandshakeError on anything wrong.

A server forwarding a client (the dialer) opens one TCP connection per
client to the holder's peer_listen (the listener):

    dialer   -> TCPRC-PEER/1 HELLO cluster=<name> node=<node> nonce=<64 hex>
    listener -> TCPRC-PEER/1 CHALLENGE node=<node> nonce=<64 hex>
    dialer   -> AUTH device=<id> service=<name or empty> proof=<64 hex>
    listener -> ACCEPT proof=<64 hex>                 then the client's bytes, raw
             or REFUSE proof=<64 hex> reason=<text>   then close
             or ERROR <text>                          (unauthenticated), then close

proof_d = HMAC-SHA256(secret, "tcprc peer dialer\\0" + HELLO + CHALLENGE + AUTH up to
" proof=").  proof_l = HMAC-SHA256(secret, "tcprc peer listener\\0" + HELLO +
CHALLENGE + AUTH + the verdict up to " proof=" and from " reason=").  Lines
count with their "\\n".  As in the device handshake (wire/handshake.py) both
sides bring a nonce, the dialer proves first (a listener never shows a MAC to
a peer that has not proved the secret), and what is asked (device, service)
is under the proof; the labels differ by direction, so neither proof can be
reflected.  Nothing secret appears in a line, an error or a repr.
"""

import hmac
import os
from typing import List, Optional, Tuple

from ..errors import PeerError
from ..wire.handshake import valid_device_id

MAGIC = b"TCPRC-PEER/1"
DIALER_LABEL = b"tcprc peer dialer\0"
LISTENER_LABEL = b"tcprc peer listener\0"
NONCE_SIZE = 32
MAX_LINE = 512
MAX_REASON = 200
AUTH_FAILED = "authentication failed"    # what a failed dialer is told, whatever the cause


class PeerHandshakeError(PeerError):
    """The handshake failed: str() is the line for this side's log; `wire_text`
    what the listener sends in its ERROR line."""

    def __init__(self, message: str, wire_text: Optional[str] = None):
        super().__init__(message)
        self.wire_text = message if wire_text is None else wire_text


def valid_name(text: str) -> bool:
    """A cluster, node, device or service name: 1..64 of [A-Za-z0-9._-]."""
    return valid_device_id(text)


def _proof(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), "sha256").digest()


def _nonce(nonce: Optional[bytes]) -> bytes:
    if nonce is None:
        return os.urandom(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError("a nonce is %d bytes" % NONCE_SIZE)
    return bytes(nonce)


def _printable(data: bytes) -> str:
    """A peer's bytes quoted for one log line, shortened."""
    text = "".join(chr(b) if 32 <= b < 127 else "\\x%02x" % b for b in bytes(data[:60]))
    return text + ("..." if len(data) > 60 else "")


class LineReader:
    """Bytes in (feed), one complete line out at a time (next_line, with its "\n");
    what follows stays in `rest` untouched: after the last handshake line it is the
    first of the raw bytes.  A line longer than MAX_LINE is an error, not a buffer
    that grows."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> None:
        self.rest += data

    def next_line(self) -> Optional[bytes]:
        end = self.rest.find(b"\n", 0, MAX_LINE + 1)
        if end >= 0:
            line, self.rest = self.rest[:end + 1], self.rest[end + 1:]
            return line
        if len(self.rest) > MAX_LINE:
            raise PeerHandshakeError("a handshake line over %d bytes: %s"
                                     % (MAX_LINE, _printable(self.rest)), "line too long")
        return None


def _fields(line: bytes, head: bytes, keys: Tuple[str, ...], what: str) -> List[str]:
    """The values of `head key=value ...` in exactly this order; the last value may
    hold spaces.  PeerHandshakeError naming `what` if the line is anything else."""
    text = line.rstrip(b"\n")
    if not text.startswith(head + b" "):
        raise PeerHandshakeError("expected %s, got %s" % (what, _printable(line)),
                                 "expected %s" % what)
    try:
        words = text[len(head) + 1:].decode("ascii").split(" ", len(keys) - 1)
    except UnicodeDecodeError:
        raise PeerHandshakeError("%s is not ASCII: %s" % (what, _printable(line)),
                                 "malformed %s" % what) from None
    values = []
    for key, word in zip(keys, words):
        name, eq, value = word.partition("=")
        if name != key or not eq:
            raise PeerHandshakeError("malformed %s: %s" % (what, _printable(line)),
                                     "malformed %s" % what)
        values.append(value)
    if len(values) != len(keys):
        raise PeerHandshakeError("malformed %s: %s" % (what, _printable(line)),
                                 "malformed %s" % what)
    return values


def _hex(text: str, size: int, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != size or len(text) != 2 * size:
        raise PeerHandshakeError("malformed %s" % what)
    return value


def _name(text: str, what: str, allow_empty: bool = False) -> str:
    if not (allow_empty and text == "") and not valid_name(text):
        raise PeerHandshakeError("malformed %s name %r" % (what, text[:70]))
    return text


def error_line(text: str) -> bytes:
    """The one line a listener refuses an unauthenticated peer with."""
    return b"ERROR " + " ".join(text.split())[:MAX_REASON].encode("ascii", "replace") + b"\n"


class DialerHandshake:
    """The forwarding server's side: hello(), on_challenge() -> AUTH,
    on_verdict() -> True (accepted: raw bytes follow) or False (refused: `reason`)."""

    def __init__(self, secret: bytes, cluster: str, node: str, device_id: str, service: str,
                 expect_node: str = "", nonce: Optional[bytes] = None):
        for what, name in (("cluster", cluster), ("node", node), ("device", device_id)):
            if not valid_name(name):
                raise ValueError("bad %s name" % what)
        if service and not valid_name(service):
            raise ValueError("bad service name")
        self._key = secret
        self.cluster = cluster
        self.node = node
        self.device_id = device_id
        self.service = service
        self.expect_node = expect_node
        self._nonce = _nonce(nonce)
        self._hello = b""
        self._challenge = b""
        self._auth = b""
        self._state = "start"
        self.peer_node = ""
        self.reason = ""

    def __repr__(self) -> str:
        return "DialerHandshake(device=%r, peer=%r, state=%s)" % (self.device_id, self.peer_node,
                                                                  self._state)

    def hello(self) -> bytes:
        if self._state != "start":
            raise ValueError("hello() once, first")
        self._hello = b"%s HELLO cluster=%s node=%s nonce=%s\n" % (
            MAGIC, self.cluster.encode(), self.node.encode(), self._nonce.hex().encode())
        self._state = "challenge"
        return self._hello

    def on_challenge(self, line: bytes) -> bytes:
        """The AUTH line to send."""
        self._expect("challenge")
        try:
            return self._on_challenge(line)
        except PeerHandshakeError as exc:
            raise self._fail(exc) from None

    def _on_challenge(self, line: bytes) -> bytes:
        if line.startswith(b"ERROR "):
            raise PeerHandshakeError("refused: %s" % _printable(line[6:].rstrip(b"\n")))
        node, nonce = _fields(line, MAGIC + b" CHALLENGE", ("node", "nonce"), "CHALLENGE")
        self.peer_node = _name(node, "node")
        _hex(nonce, NONCE_SIZE, "CHALLENGE nonce")
        if self.expect_node and self.peer_node != self.expect_node:
            raise PeerHandshakeError("dialed node %s, but node %s answered"
                                     % (self.expect_node, self.peer_node))
        self._challenge = bytes(line)
        asked = b"AUTH device=%s service=%s" % (self.device_id.encode(), self.service.encode())
        proof = _proof(self._key, DIALER_LABEL, self._hello, self._challenge, asked)
        self._auth = asked + b" proof=" + proof.hex().encode() + b"\n"
        self._state = "verdict"
        return self._auth

    def on_verdict(self, line: bytes) -> bool:
        """True: accepted.  False: refused by the holder, `reason` says why (its proof
        checked).  PeerHandshakeError otherwise."""
        self._expect("verdict")
        try:
            return self._on_verdict(line)
        except PeerHandshakeError as exc:
            raise self._fail(exc) from None

    def _on_verdict(self, line: bytes) -> bool:
        if line.startswith(b"ERROR "):
            raise PeerHandshakeError("node %s refused us: %s" % (
                self.peer_node, _printable(line[6:].rstrip(b"\n"))))
        if line.startswith(b"ACCEPT "):
            (proof,) = _fields(line, b"ACCEPT", ("proof",), "ACCEPT")
            signed, accepted = b"ACCEPT", True
        else:
            proof, reason = _fields(line, b"REFUSE", ("proof", "reason"), "ACCEPT or REFUSE")
            signed, accepted = b"REFUSE reason=" + reason.encode("ascii"), False
            self.reason = reason
        expected = _proof(self._key, LISTENER_LABEL, self._hello, self._challenge, self._auth, signed)
        if not hmac.compare_digest(_hex(proof, len(expected), "verdict proof"), expected):
            raise PeerHandshakeError("node %s failed to prove the cluster secret" % self.peer_node)
        self._state = "done"
        return accepted

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise self._fail(PeerHandshakeError("handshake out of order (%s, expected %s)"
                                                % (self._state, state)))

    def _fail(self, error: PeerHandshakeError) -> PeerHandshakeError:
        self._state = "failed"
        return error


class ListenerHandshake:
    """The holder's side: on_hello() -> CHALLENGE, on_auth() checks the proof and
    sets device_id, service, peer_node; then accept() or refuse(reason) -> the line."""

    def __init__(self, secret: bytes, cluster: str, node: str, nonce: Optional[bytes] = None):
        self._key = secret
        self.cluster = cluster
        self.node = node
        self._nonce = _nonce(nonce)
        self._hello = b""
        self._challenge = b""
        self._auth = b""
        self._state = "hello"
        self.peer_node = ""
        self.device_id = ""
        self.service = ""

    def __repr__(self) -> str:
        return "ListenerHandshake(peer=%r, device=%r, state=%s)" % (self.peer_node, self.device_id,
                                                                    self._state)

    @property
    def authenticated(self) -> bool:
        return self._state in ("verdict", "done")

    def on_hello(self, line: bytes) -> bytes:
        """The CHALLENGE line to send."""
        self._expect("hello")
        try:
            return self._on_hello(line)
        except PeerHandshakeError as exc:
            raise self._fail(exc) from None

    def _on_hello(self, line: bytes) -> bytes:
        if not line.startswith(MAGIC + b" "):
            raise PeerHandshakeError("not a tcprc peer: %s" % _printable(line),
                                     "expected %s HELLO" % MAGIC.decode())
        cluster, node, nonce = _fields(line, MAGIC + b" HELLO", ("cluster", "node", "nonce"), "HELLO")
        cluster = _name(cluster, "cluster")
        self.peer_node = _name(node, "node")
        _hex(nonce, NONCE_SIZE, "HELLO nonce")
        if cluster != self.cluster:
            raise PeerHandshakeError(
                "node %s is of cluster %s, not %s" % (self.peer_node, cluster, self.cluster),
                "this is cluster %s" % self.cluster)
        self._hello = bytes(line)
        self._challenge = b"%s CHALLENGE node=%s nonce=%s\n" % (MAGIC, self.node.encode(),
                                                                self._nonce.hex().encode())
        self._state = "auth"
        return self._challenge

    def on_auth(self, line: bytes) -> None:
        """Returns when the peer proved the secret; device_id and service are what it asks."""
        self._expect("auth")
        try:
            self._on_auth(line)
        except PeerHandshakeError as exc:
            raise self._fail(exc) from None

    def _on_auth(self, line: bytes) -> None:
        device_id, service, proof = _fields(line, b"AUTH", ("device", "service", "proof"), "AUTH")
        signed = line[:line.rindex(b" proof=")]
        expected = _proof(self._key, DIALER_LABEL, self._hello, self._challenge, signed)
        try:
            given = _hex(proof, len(expected), "AUTH proof")
        except PeerHandshakeError:
            given = bytes(len(expected))
        if not hmac.compare_digest(given, expected):
            raise PeerHandshakeError("node %s: bad proof of the cluster secret" % self.peer_node,
                                     AUTH_FAILED)
        self.device_id = _name(device_id, "device")
        self.service = _name(service, "service", allow_empty=True)
        self._auth = bytes(line)
        self._state = "verdict"

    def accept(self) -> bytes:
        """The ACCEPT line: after it the connection carries the client's bytes."""
        return b"ACCEPT proof=" + self._verdict(b"ACCEPT") + b"\n"

    def refuse(self, reason: str) -> bytes:
        """The REFUSE line; `reason` (one line, shortened) is what the dialer logs."""
        text = " ".join(reason.split())[:MAX_REASON].encode("ascii", "replace") or b"refused"
        proof = self._verdict(b"REFUSE reason=" + text)
        return b"REFUSE proof=" + proof + b" reason=" + text + b"\n"

    def _verdict(self, signed: bytes) -> bytes:
        if self._state != "verdict":
            raise ValueError("a verdict needs an authenticated peer, once")
        self._state = "done"
        return _proof(self._key, LISTENER_LABEL, self._hello, self._challenge, self._auth,
                      signed).hex().encode()

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise self._fail(PeerHandshakeError("handshake out of order (%s, expected %s)"
                                                % (self._state, state), "out of order"))

    def _fail(self, error: PeerHandshakeError) -> PeerHandshakeError:
        self._state = "failed"
        return error
