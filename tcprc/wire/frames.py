"""The uplink frame codec (PROTOCOL.md): a 4-byte big-endian header, then the payload.

    u16 payload length | u8 command | u8 client id | payload

No I/O here: the decoder works over a buffer its caller owns and fills
(engine.buffers.FrameBuffer reads a socket into it).
"""

import struct
from typing import Any, Iterator, List, Optional, Tuple

from ..errors import PeerError

HEADER = struct.Struct("!HBB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 0xFFFF

CONNECT = 1
CLOSE = 2
DATA = 3
LISTEN = 4

COMMAND_NAMES = {CONNECT: "CONNECT", CLOSE: "CLOSE", DATA: "DATA", LISTEN: "LISTEN"}

_PORT = struct.Struct("!H")


class ProtocolError(PeerError, ValueError):
    """A frame whose content breaks the protocol; ends at most its stream."""


def encode(command: int, client_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return HEADER.pack(len(payload), command, client_id) + payload


def header(command: int, client_id: int, length: int) -> bytes:
    return HEADER.pack(length, command, client_id)


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
