"""The uplink frame codec of docs/protocol.md: a 4-byte big-endian header, then the payload.

    u16 payload length | u8 command | u8 client id | payload
"""

import struct
from typing import Any, Iterator, Optional, Tuple

from .buffers import KEEP, Pages, anonymous

HEADER = struct.Struct("!HBB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 0xFFFF

CONNECT = 1
CLOSE = 2
DATA = 3
LISTEN = 4

COMMAND_NAMES = {CONNECT: "CONNECT", CLOSE: "CLOSE", DATA: "DATA", LISTEN: "LISTEN"}

_PORT = struct.Struct("!H")


class ProtocolError(ValueError):
    """A frame whose content breaks the protocol; ends at most its stream."""


def encode(command: int, client_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return HEADER.pack(len(payload), command, client_id) + payload


def header(command: int, client_id: int, length: int) -> bytes:
    return HEADER.pack(length, command, client_id)


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
    if any(not c.isprintable() or c.isspace() for c in address):
        raise ProtocolError("CONNECT address %r contains control characters" % address)
    (port,) = _PORT.unpack_from(payload, 2 + addr_len)
    return address, port


class FrameBuffer:
    """Incremental decoder over one reusable buffer.

    The owner calls `receive(sock)` (or receives into `writable()` and
    reports the byte count to `filled()`); `frames()` then yields (command,
    client id, payload view) for every complete frame, and `sole_data()`
    takes the common case of exactly one DATA frame.  Payload views point
    into the buffer and are only valid until the next `receive()`,
    `writable()` or `calm()` call.  The buffer never grows: it holds at
    least one maximal frame, and a partial frame is moved to its start.
    """

    def __init__(self, size: int = 1024 * 1024):
        if size < HEADER_SIZE + MAX_PAYLOAD:
            raise ValueError("buffer must hold one maximal frame")
        # Mapped, not a zero-filled bytearray: an idle uplink pays only for
        # the pages its frames reached, and only until traffic calms down
        # (buffers.Pages).  1 MB: a bulk read holds 16 frames.
        self._buf = anonymous(size)
        self._view = memoryview(self._buf)
        self._pages = Pages(self._buf)
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

    def receive(self, sock: Any, flags: int = 0) -> int:
        """recv_into the free space and keep what came; 0 when the peer closed.

        Raises what recv_into raises.
        """
        if self._start == self._end:   # all consumed: the whole buffer is free
            self._start = self._end = 0
            count = sock.recv_into(self._view, 0, flags)
        else:
            count = sock.recv_into(self.writable(), 0, flags)
        self._end += count
        if self._end > KEEP or self._pages.wide:
            self._pages.note(self._end)
        return count

    def calm(self) -> None:
        """Traffic stopped (the last stream closed): when nothing is held past
        the first KEEP bytes, give the pages there back now.  Not while
        payload views of the last read are in use: they may lie there."""
        if self._start == self._end:
            self._start = self._end = 0
        if self._pages.wide and self._end <= KEEP:
            self._pages.release()

    def filled(self, count: int) -> None:
        self._end += count

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
