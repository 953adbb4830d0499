"""The head of one HTTP/1.x request, read from a socket within limits.

http.client's own reader takes 100 header lines of 64 KB each and waits
for them one recv timeout at a time, so 40 stalled clients could hold
hundreds of MB (issue 19).  Here the whole head is at most MAX_HEAD bytes,
a line at most MAX_LINE, at most MAX_HEADERS lines, and it must arrive
before one deadline; anything else is a HeadError carrying the status to
answer.  Only what the status page needs is parsed: the request line and
the header fields (no bodies, no folded lines).
"""

import socket
import time
from typing import Dict, NamedTuple, Optional

MAX_LINE = 8192        # bytes of the request line or of one header line
MAX_HEAD = 32768       # bytes of the whole head
MAX_HEADERS = 64       # header lines

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HeadError(Exception):
    """The head cannot be served: `status` to answer (None: the client left, say nothing)."""

    def __init__(self, status: Optional[int], reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request(NamedTuple):
    method: str
    path: str                 # the target without its query
    version: str              # "HTTP/1.0" or "HTTP/1.1"
    headers: Dict[str, str]   # lower-case names; a repeated field's values joined by ", "


def read_head(sock: socket.socket, deadline: float) -> bytes:
    """The bytes of the head up to the blank line that ends it (both excluded).
    HeadError when the client stops before it or sends nothing until `deadline`
    (None), takes past `deadline` (408) or sends more than the limits allow (414
    for the request line, else 431).
    Bytes after the head (a body, a pipelined request) are not read on."""
    data = bytearray()
    line_start = lines = 0
    while True:
        newline = data.find(b"\n", line_start)
        while newline >= 0:   # every complete line once
            if data[line_start:newline] in (b"", b"\r"):
                return bytes(data[:max(0, line_start - 1)]).rstrip(b"\r")
            _check_line(lines, newline - line_start)
            lines += 1
            line_start = newline + 1
            newline = data.find(b"\n", line_start)
        _check_line(lines, len(data) - line_start)   # the line still arriving
        if len(data) >= MAX_HEAD:
            raise HeadError(431, "request head longer than %d bytes" % MAX_HEAD)
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)
            chunk = sock.recv(MAX_HEAD - len(data))
        except socket.timeout:
            if not data:   # an idle connection (a browser's unused preconnect): no word
                raise HeadError(None, "sent nothing") from None
            raise HeadError(408, "the request head took too long") from None
        if not chunk:
            raise HeadError(None, "hung up before the end of the request head")
        data += chunk


def _check_line(index: int, size: int) -> None:
    """Line `index` of the head (0: the request line) may be `size` bytes long."""
    if size > MAX_LINE:
        if index == 0:
            raise HeadError(414, "request line longer than %d bytes" % MAX_LINE)
        raise HeadError(431, "header line longer than %d bytes" % MAX_LINE)
    if index > MAX_HEADERS:
        raise HeadError(431, "more than %d header lines" % MAX_HEADERS)


def parse_head(head: bytes) -> Request:
    """The request in `head` (read_head's bytes); HeadError(400, 505) if malformed."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not parts[0] or not _TOKEN.issuperset(parts[0]):
        raise HeadError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HeadError(505 if version.startswith("HTTP/") else 400,
                        "unsupported protocol version")
    if not target.startswith("/"):
        raise HeadError(400, "the target must be a path")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        line = line.rstrip("\r")
        name, colon, value = line.partition(":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise HeadError(400, "malformed header line")
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            if name in ("host", "authorization"):   # which one would count? neither
                raise HeadError(400, "repeated %s header" % name)
            value = headers[name] + ", " + value
        headers[name] = value
    return Request(method, target.split("?", 1)[0], version, headers)
