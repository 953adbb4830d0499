"""The uplink frame codec (PROTOCOL.md): a 4-byte big-endian header, then the payload.

    u16 payload length | u8 command | u8 client id | payload

No I/O here: the decoder works over a buffer its caller owns and fills
(engine.buffers.FrameBuffer reads a socket into it).

Protocol version 2 (docs/protocol.md, "Protocol version 2") adds commands
5..14 and their payload codecs below; the handshake's MAC lives in
wire.handshake, which only a v2 uplink imports.
"""

import errno
import struct
import sys
from typing import Any, Iterator, List, Optional, Tuple

from ..errors import PeerError

HEADER = struct.Struct("!HBB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 0xFFFF

CONNECT = 1
CLOSE = 2
DATA = 3
LISTEN = 4

# Protocol version 2 (never sent to a peer that has not said it knows them).
OFFER = 5
HELLO = 6
CHALLENGE = 7
AUTH = 8
WELCOME = 9
REJECT = 10
CREDIT = 11
EOF = 12
PING = 13
PONG = 14

COMMAND_NAMES = {CONNECT: "CONNECT", CLOSE: "CLOSE", DATA: "DATA", LISTEN: "LISTEN",
                 OFFER: "OFFER", HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH",
                 WELCOME: "WELCOME", REJECT: "REJECT", CREDIT: "CREDIT", EOF: "EOF",
                 PING: "PING", PONG: "PONG"}

_PORT = struct.Struct("!H")


class ProtocolError(PeerError, ValueError):
    """A frame whose content breaks the protocol; ends at most its stream."""


def encode(command: int, client_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return HEADER.pack(len(payload), command, client_id) + payload


def header(command: int, client_id: int, length: int) -> bytes:
    return HEADER.pack(length, command, client_id)


_pack = HEADER.pack


def data_header(client_id: int, length: int) -> bytes:
    """The header of a DATA frame with `length` payload bytes (the sender's fast path)."""
    return _pack(length, DATA, client_id)


def coalesce_key(command: int, client_id: int) -> Optional[int]:
    """A key that is the same for control frames one queued copy says all of: a
    CLOSE for an id is never queued twice while unsent (a peer that never reads
    must not grow the queue by asking again); None for any other frame."""
    return client_id if command == CLOSE else None


def data_frames(client_id: int, data: Any) -> Tuple[List[Any], int]:
    """DATA of any length as sendmsg parts (header, payload, header, ...) and
    their total byte count: as many frames as MAX_PAYLOAD makes it."""
    size = len(data)
    parts: List[Any] = []
    pack = HEADER.pack
    for start in range(0, size, MAX_PAYLOAD):
        chunk = data[start:start + MAX_PAYLOAD]
        parts.append(pack(len(chunk), DATA, client_id))
        parts.append(chunk)
    return parts, HEADER_SIZE * (len(parts) // 2) + size


# Frames whose read the receiver acknowledges at once (engine.link's quick ACK):
# nothing answers a CLOSE, and a peer with Nagle on holds its next small frame
# until the ACK comes.
ACK_AT_ONCE = frozenset((CLOSE,))

# A v2 CONNECT to a named service of the device ([device.services.NAME]): the
# address is this prefix and the name, the port 0.  It is no host name (a
# colon) nor IPv6 address ("s" is no hex digit): it names no real target.
SERVICE_PREFIX = "service:"


def encode_connect_payload(address: str, port: int) -> bytes:
    raw = address.encode("ascii")
    return _PORT.pack(len(raw)) + raw + _PORT.pack(port)


def decode_connect_payload(payload: bytes) -> Tuple[str, int]:
    """Return (address, port); raise ProtocolError when the payload is malformed."""
    if len(payload) < 4:
        raise ProtocolError("CONNECT payload of %d bytes is too short" % len(payload))
    (addr_len,) = _PORT.unpack_from(payload, 0)
    if len(payload) != 2 + addr_len + 2:
        raise ProtocolError("CONNECT payload of %d bytes does not match address length %d"
                            % (len(payload), addr_len))
    try:
        address = bytes(payload[2:2 + addr_len]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("CONNECT address is not ASCII") from None
    # ASCII: a space is the only white space that is printable.  Two calls on
    # the whole string, not a generator over its characters: every CONNECT
    # of a default server names an address.
    if not address.isprintable() or " " in address:
        raise ProtocolError("CONNECT address %r contains control characters" % address)
    (port,) = _PORT.unpack_from(payload, 2 + addr_len)
    return address, port


class FrameDecoder:
    """Incremental decoder over one buffer the caller owns and fills.

    The caller receives into `writable()` and reports the byte count to
    `filled()`; `frames()` then yields (command, client id, payload view)
    for every complete frame, and `sole_data()` takes the common case of
    exactly one DATA frame.  Payload views point into the buffer and are
    only valid until the next fill.  The buffer never grows: it holds at
    least one maximal frame, and a partial frame is moved to its start.
    """

    def __init__(self, buf) -> None:
        if len(buf) < HEADER_SIZE + MAX_PAYLOAD:
            raise ValueError("buffer must hold one maximal frame")
        self._buf = buf
        self._view = memoryview(buf)
        self._start = 0
        self._end = 0

    def writable(self) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < HEADER_SIZE + MAX_PAYLOAD:
            # Compact only when the tail could not take a whole frame; the
            # copy goes through bytes() because the regions may overlap.
            pending = self._end - self._start
            self._buf[:pending] = bytes(self._view[self._start:self._end])
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def filled(self, count: int) -> None:
        self._end += count

    def feed(self, data: bytes) -> None:
        """Copy `data` in (tests, and callers without a buffer of their own)."""
        view, done = memoryview(data), 0
        while done < len(view):
            free = self.writable()
            if not len(free):
                raise ValueError("decoder buffer full: consume frames first")
            count = min(len(free), len(view) - done)
            free[:count] = view[done:done + count]
            self._end += count
            done += count

    def pending(self) -> int:
        """Bytes of an incomplete frame held back (useful when the peer hangs up)."""
        return self._end - self._start

    def frames(self) -> Iterator[Tuple[int, int, memoryview]]:
        view, unpack = self._view, HEADER.unpack_from
        while self._end - self._start >= HEADER_SIZE:
            length, command, client_id = unpack(view, self._start)
            begin = self._start + HEADER_SIZE
            if self._end - begin < length:
                return
            self._start = begin + length
            yield command, client_id, view[begin:begin + length]

    def runs(self) -> Iterator[Tuple[Optional[int], int, Any]]:
        """Every complete frame, the DATA frames of one client in a row joined into a
        run: (None, client id, [payloads]) for a run (its payloads reach the
        client's socket in one sendmsg), (command, client id, payload) for any
        other frame.  Views as in frames()."""
        view, unpack = self._view, HEADER.unpack_from
        run_id, run = -1, []   # type: Tuple[int, List[memoryview]]
        while self._end - self._start >= HEADER_SIZE:
            length, command, client_id = unpack(view, self._start)
            begin = self._start + HEADER_SIZE
            if self._end - begin < length:
                break
            self._start = begin + length
            payload = view[begin:begin + length]
            if command == DATA:
                if client_id == run_id:
                    run.append(payload)
                    continue
                if run:
                    yield None, run_id, run
                run_id, run = client_id, [payload]
                continue
            if run:
                yield None, run_id, run
                run_id, run = -1, []
            yield command, client_id, payload
        if run:
            yield None, run_id, run

    def sole_data(self) -> Optional[Tuple[int, memoryview]]:
        """(client id, payload) when the buffer holds exactly one whole DATA frame,
        which is then consumed; None, consuming nothing, otherwise.

        The interactive case (a keystroke, an answer) in one step, without
        the generator that frames() needs for the general case.
        """
        start = self._start
        if self._end - start < HEADER_SIZE:
            return None
        length, command, client_id = HEADER.unpack_from(self._view, start)
        if command != DATA or self._end - start != HEADER_SIZE + length:
            return None
        self._start = self._end
        return client_id, self._view[start + HEADER_SIZE:self._end]

    def incomplete_frame(self) -> Optional[str]:
        """Describe the partial frame left over, for the log when the uplink ends."""
        held = self.pending()
        if not held:
            return None
        if held < HEADER_SIZE:
            return "%d of %d header bytes" % (held, HEADER_SIZE)
        length, command, client_id = HEADER.unpack_from(self._view, self._start)
        return "%s frame for client %d with %d of %d payload bytes" % (
            COMMAND_NAMES.get(command, "command %d" % command), client_id,
            held - HEADER_SIZE, length)


# ---------------------------------------------------------------------------
# Protocol version 2: payload codecs.  Decoders take bytes or a memoryview,
# check the whole layout and raise ProtocolError with a one-line reason;
# encoders raise ValueError (our own bug), except that texts are clipped.

V2 = 2
NONCE_SIZE = 32
PROOF_SIZE = 32             # HMAC-SHA256
MAX_ID = 64                 # characters of a device id
MAX_TEXT = 200              # UTF-8 bytes of a REJECT or CLOSE text
MAX_HOST = 255              # bytes of the WELCOME text
MAX_CREDIT = 1 << 31        # also the largest window
PING_SIZE = 8

OFFER_FRAME = HEADER.pack(0, OFFER, V2)   # 00 00 05 02

# REJECT codes.
REJECT_UNKNOWN_ID = 1       # reserved: a server does not tell unknown ids apart (it sends 2)
REJECT_BAD_PROOF = 2
REJECT_IDENTITY_REQUIRED = 3
REJECT_VERSION = 4
REJECT_HOST_BUSY = 5
REJECT_MALFORMED = 6
REJECT_SERVER_ERROR = 7
REJECT_IDENTITY_CONFLICT = 8
REJECT_CODES = {1: "unknown id", 2: "bad proof", 3: "identity required",
                4: "unsupported version", 5: "host port busy", 6: "malformed handshake",
                7: "server error", 8: "identity in use elsewhere"}

# CLOSE reasons.
CLOSE_DONE = 0
CLOSE_RESET = 1
CLOSE_REFUSED = 2
CLOSE_UNREACHABLE = 3
CLOSE_TIMEOUT = 4
CLOSE_NOT_ALLOWED = 5
CLOSE_ERROR = 6
CLOSE_REASONS = {0: "done", 1: "reset", 2: "refused", 3: "unreachable", 4: "timed out",
                 5: "not allowed", 6: "error"}

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_HELLO_FIXED = struct.Struct("!BB32sIB")     # version, flags, nonce_d, window, id_len
_CHALLENGE = struct.Struct("!B32sI")         # version, nonce_s, window
_CREDIT_FRAME = struct.Struct("!HBBI")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class VersionError(ProtocolError):
    """A HELLO or CHALLENGE of another protocol version (REJECT 4, not 6)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


def reject_name(code: int) -> str:
    return REJECT_CODES.get(code, "code %d" % code)


def close_reason_name(reason: int) -> str:
    return CLOSE_REASONS.get(reason, "reason %d" % reason)


def valid_id(text: str) -> bool:
    """A device id as HELLO carries it: 0..64 of [A-Za-z0-9._-] ("" = none)."""
    return len(text) <= MAX_ID and not set(text) - _ID_CHARS


def clip_text(text: str, limit: int = MAX_TEXT) -> bytes:
    """`text` as UTF-8 for a REJECT or CLOSE: one printable line of at most
    `limit` bytes, cut on a character boundary."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _text(raw: Any, what: str, limit: int = MAX_TEXT) -> str:
    if len(raw) > limit:
        raise ProtocolError("%s text of %d bytes exceeds %d" % (what, len(raw), limit))
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("%s text is not UTF-8" % what) from None
    if not text.isprintable():
        raise ProtocolError("%s text contains control characters" % what)
    return text


def _window(window: int, what: str) -> int:
    if not 0 < window <= MAX_CREDIT:
        raise ProtocolError("%s window %d is outside 1..%d" % (what, window, MAX_CREDIT))
    return window


def _proof_len(payload: Any, at: int, what: str) -> int:
    """The u8 proof_len at `at`: 0 or PROOF_SIZE."""
    if len(payload) <= at:
        raise ProtocolError("%s payload of %d bytes has no proof length" % (what, len(payload)))
    proof_len = payload[at]
    if proof_len not in (0, PROOF_SIZE):
        raise ProtocolError("%s proof length %d is neither 0 nor %d"
                            % (what, proof_len, PROOF_SIZE))
    return proof_len


def _version(payload: Any, what: str) -> None:
    if not len(payload):
        raise ProtocolError("%s payload is empty" % what)
    if payload[0] != V2:
        raise VersionError("%s of protocol version %d (this side speaks %d)"
                           % (what, payload[0], V2), payload[0])


def encode_hello(nonce: bytes, window: int, device_id: str = "") -> bytes:
    if len(nonce) != NONCE_SIZE or not 0 < window <= MAX_CREDIT or not valid_id(device_id):
        raise ValueError("bad HELLO field")
    raw = device_id.encode("ascii")
    return _HELLO_FIXED.pack(V2, 0, nonce, window, len(raw)) + raw


def decode_hello(payload: Any) -> Tuple[bytes, int, str]:
    """(nonce_d, window, device id: "" = none) of a version 2 HELLO.

    Plain tuples, not NamedTuples: a legacy agent imports this module too."""
    _version(payload, "HELLO")
    fixed = _HELLO_FIXED.size
    if len(payload) < fixed:
        raise ProtocolError("HELLO payload of %d bytes is too short" % len(payload))
    _, flags, nonce, window, id_len = _HELLO_FIXED.unpack_from(payload)
    if flags:
        raise ProtocolError("HELLO flags %#04x: none are defined" % flags)
    if len(payload) != fixed + id_len:
        raise ProtocolError("HELLO payload of %d bytes does not match id length %d"
                            % (len(payload), id_len))
    if id_len > MAX_ID:
        raise ProtocolError("HELLO id of %d bytes exceeds %d" % (id_len, MAX_ID))
    device_id = bytes(payload[fixed:]).decode("latin-1")
    if not valid_id(device_id):
        raise ProtocolError("HELLO id has characters outside [A-Za-z0-9._-]")
    return nonce, _window(window, "HELLO"), device_id


def encode_challenge(nonce: bytes, window: int) -> bytes:
    if len(nonce) != NONCE_SIZE or not 0 < window <= MAX_CREDIT:
        raise ValueError("bad CHALLENGE field")
    return _CHALLENGE.pack(V2, nonce, window)


def decode_challenge(payload: Any) -> Tuple[bytes, int]:
    """(nonce_s, window) of a version 2 CHALLENGE."""
    _version(payload, "CHALLENGE")
    if len(payload) != _CHALLENGE.size:
        raise ProtocolError("CHALLENGE payload of %d bytes is not %d"
                            % (len(payload), _CHALLENGE.size))
    _, nonce, window = _CHALLENGE.unpack_from(payload)
    return nonce, _window(window, "CHALLENGE")


def encode_auth(proof: bytes = b"") -> bytes:
    if len(proof) not in (0, PROOF_SIZE):
        raise ValueError("bad AUTH proof length")
    return bytes((len(proof),)) + proof


def decode_auth(payload: Any) -> bytes:
    """The proof: b"" or PROOF_SIZE bytes."""
    proof_len = _proof_len(payload, 0, "AUTH")
    if len(payload) != 1 + proof_len:
        raise ProtocolError("AUTH payload of %d bytes does not match proof length %d"
                            % (len(payload), proof_len))
    return bytes(payload[1:])


def encode_welcome(host: str, proof: bytes = b"") -> bytes:
    raw = host.encode("ascii")
    if not raw or len(raw) > MAX_HOST or len(proof) not in (0, PROOF_SIZE):
        raise ValueError("bad WELCOME field")
    return bytes((len(proof),)) + proof + _PORT.pack(len(raw)) + raw


def decode_welcome(payload: Any) -> Tuple[bytes, str]:
    """(proof: b"" or PROOF_SIZE bytes, the "ADDR:PORT" text: printable ASCII
    without spaces, 1..255 bytes)."""
    at = 1 + _proof_len(payload, 0, "WELCOME")
    if len(payload) < at + 2:
        raise ProtocolError("WELCOME payload of %d bytes is too short" % len(payload))
    proof = bytes(payload[1:at])
    (size,) = _PORT.unpack_from(payload, at)
    at += 2
    if len(payload) != at + size:
        raise ProtocolError("WELCOME payload of %d bytes does not match text length %d"
                            % (len(payload), size))
    if not 0 < size <= MAX_HOST:
        raise ProtocolError("WELCOME text of %d bytes is outside 1..%d" % (size, MAX_HOST))
    try:
        host = bytes(payload[at:]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("WELCOME text is not ASCII") from None
    if not host.isprintable() or " " in host:
        raise ProtocolError("WELCOME text contains spaces or control characters")
    return proof, host


def encode_reject(code: int, text: str = "") -> bytes:
    if not 0 < code < 256:
        raise ValueError("bad REJECT code %r" % code)
    return bytes((code,)) + clip_text(text)


def decode_reject(payload: Any) -> Tuple[int, str]:
    """(code, text); a code this side does not know is returned as it is."""
    if not len(payload):
        raise ProtocolError("REJECT payload is empty")
    if not payload[0]:
        raise ProtocolError("REJECT code 0 is not a code")
    return payload[0], _text(payload[1:], "REJECT")


def credit_frame(client_id: int, amount: int) -> bytes:
    """A whole CREDIT frame, header included, in one pack."""
    if not 0 < amount <= MAX_CREDIT:
        raise ValueError("credit %d is outside 1..%d" % (amount, MAX_CREDIT))
    return _CREDIT_FRAME.pack(4, CREDIT, client_id, amount)


def encode_credit(amount: int) -> bytes:
    """CREDIT's payload, for a sender that builds the header itself (FrameWriter.post)."""
    if not 0 < amount <= MAX_CREDIT:
        raise ValueError("credit %d is outside 1..%d" % (amount, MAX_CREDIT))
    return _U32.pack(amount)


def decode_credit(payload: Any) -> int:
    if len(payload) != 4:
        raise ProtocolError("CREDIT payload of %d bytes is not 4" % len(payload))
    (amount,) = _U32.unpack(payload)
    if not 0 < amount <= MAX_CREDIT:
        raise ProtocolError("CREDIT of %d is outside 1..%d" % (amount, MAX_CREDIT))
    return amount


def check_empty(command: int, payload: Any) -> None:
    """OFFER and EOF carry nothing."""
    if len(payload):
        raise ProtocolError("%s payload of %d bytes should be empty"
                            % (COMMAND_NAMES.get(command, "command %d" % command), len(payload)))


def encode_ping(stamp: int) -> bytes:
    """PING's 8 bytes: the sender's clock (monotonic ns), wrapped to 64 bits."""
    return _U64.pack(stamp & 0xFFFFFFFFFFFFFFFF)


def decode_ping(payload: Any) -> bytes:
    """The 8 bytes to echo in the PONG."""
    if len(payload) != PING_SIZE:
        raise ProtocolError("PING payload of %d bytes is not %d" % (len(payload), PING_SIZE))
    return bytes(payload)


def decode_pong(payload: Any) -> int:
    """The stamp the PONG echoes, as encode_ping wrote it."""
    if len(payload) != PING_SIZE:
        raise ProtocolError("PONG payload of %d bytes is not %d" % (len(payload), PING_SIZE))
    return _U64.unpack(payload)[0]


def encode_close_reason(reason: int, text: str = "") -> bytes:
    """A v2 CLOSE payload; a plain "done" is the empty payload."""
    if not 0 <= reason < 256:
        raise ValueError("bad CLOSE reason %r" % reason)
    if reason == CLOSE_DONE and not text:
        return b""
    return bytes((reason,)) + clip_text(text)


def decode_close_reason(payload: Any) -> Tuple[int, str]:
    """(reason, text), (0, "") for an empty payload.  A reason this side does
    not know is returned as it is (the receiver treats it as 6, error)."""
    if not len(payload):
        return CLOSE_DONE, ""
    return payload[0], _text(payload[1:], "CLOSE")


def close_reason_for(exc: BaseException, refused_by_policy: bool = False) -> int:
    """The CLOSE reason that tells the peer why a stream could not be opened
    (or broke): policy, then the error's kind."""
    if refused_by_policy:
        return CLOSE_NOT_ALLOWED
    # The wire layer imports no socket module; an error that came from one
    # means it is loaded.
    sock = sys.modules.get("socket")
    if sock is not None:
        if isinstance(exc, sock.gaierror):
            return CLOSE_UNREACHABLE
        if isinstance(exc, sock.timeout):
            return CLOSE_TIMEOUT
    if isinstance(exc, TimeoutError):
        return CLOSE_TIMEOUT
    code = getattr(exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return CLOSE_REFUSED
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return CLOSE_UNREACHABLE
    if code == errno.ETIMEDOUT:
        return CLOSE_TIMEOUT
    if code == errno.ECONNRESET:
        return CLOSE_RESET
    return CLOSE_ERROR
