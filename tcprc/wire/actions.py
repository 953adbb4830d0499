"""What the protocol core asks its driver to do: one typed action per thing to carry out.

A session (wire.session) answers every event with a list of these, in the
order they must happen; the driver (engine.link) carries each out with the
handler it keeps for that type, and stops at the first Fail.  Roles add no
subclasses: the server's link handles Listened, Authed, Denied and Unlisten,
the device's OpenLocal; a role that meets an action it has no handler for
logs it as unexpected.

Actions are allocated for control frames only (a CREDIT per quarter
window, a CLOSE per stream...), never per DATA frame: the DATA fast path
asks its stream's rules (wire.streams) directly.
"""

from typing import NamedTuple

# Log levels, as the logging module numbers them (wire imports no logging).
DEBUG = 10
INFO = 20
WARNING = 30


# ---- the uplink ----------------------------------------------------------------------

class Send(NamedTuple):
    """Queue a control frame for the peer (never blocking the link thread)."""
    command: int
    client_id: int
    payload: bytes


class Log(NamedTuple):
    """One line about this uplink (rate-limited by the driver when WARNING)."""
    level: int
    message: str


class Fail(NamedTuple):
    """End the uplink; the first reason is the one kept."""
    reason: str


# ---- the session's milestones (the role's to carry out) -------------------------------

class Listened(NamedTuple):
    """Server: a legacy session is established; claim [server] host."""


class Authed(NamedTuple):
    """Server: a v2 handshake proved `device_id` (or no id); claim its host port,
    then answer with the session's welcome() or reject()."""
    device_id: str


class Denied(NamedTuple):
    """Server: a handshake failed its checks (logged with the source, throttled)."""
    device_id: str
    message: str


class Unlisten(NamedTuple):
    """Server: a HELLO came after the session was taken as legacy, before any
    client: give the host port back."""


class Upgraded(NamedTuple):
    """Version 2 is negotiated: streams opened from now on follow its rules."""
    peer_window: int
    detail: str


class OpenLocal(NamedTuple):
    """Device: a CONNECT asks for a stream to `address`:`port` (the role's target
    policy decides where it really goes); `early`: DATA held for it."""
    client_id: int
    address: str
    port: int
    early: bytearray


# ---- streams ----------------------------------------------------------------------------

class DropStream(NamedTuple):
    """Cut the stream on `client_id` without a CLOSE (a CONNECT replaced it)."""
    client_id: int
    reason: str


class CloseStream(NamedTuple):
    """This side ends the stream: CLOSE (with `code` and `text` where the rules
    carry reasons) and cut the local socket."""
    client_id: int
    reason: str
    code: int
    text: str


class PeerClosed(NamedTuple):
    """The peer's CLOSE for an open stream: what it sent before goes to the local
    socket, which is then shut (`code` 1, a reset: reset at once); `answered`:
    it answers a CLOSE of ours."""
    client_id: int
    code: int
    text: str
    answered: bool


class PeerEof(NamedTuple):
    """The peer's EOF: after the bytes queued, the local socket's write half is shut."""
    client_id: int


class Grant(NamedTuple):
    """The peer's CREDIT: the stream may send `amount` more bytes."""
    client_id: int
    amount: int


# Singletons for the actions without fields: nothing is allocated for them.
LISTENED = Listened()
UNLISTEN = Unlisten()
