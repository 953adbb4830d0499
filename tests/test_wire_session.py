"""A device session and a server session driven against each other in memory, no sockets
(as h11's tests drive a connection pair): the legacy use cases, frame by frame."""

from typing import Any, Dict, List, Tuple

from tcprc.server.ids import ClientIds
from tcprc.wire import actions as act
from tcprc.wire import session as wire
from tcprc.wire.server_session import ServerSession
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN, OFFER, V2, encode_connect_payload

WARN, DEBUG = act.WARNING, act.DEBUG


class Side:
    """What a link does with its session's actions, with dicts for streams."""

    def __init__(self, session: wire.Session):
        self.session = session
        self.open: Dict[int, bytearray] = {}        # id -> bytes received on the stream
        self.rules: Dict[int, Any] = {}              # id -> its rules (wire.streams)
        self.out: List[Tuple[int, int, bytes]] = []  # frames sent, not yet delivered
        self.logs: List[Tuple[int, str]] = []
        self.opened: List[Tuple[int, str, int]] = []
        self.failed = ""
        self.listened = 0

    def add(self, client_id: int, data: bytes = b"") -> None:
        self.open[client_id] = bytearray(data)
        self.rules[client_id] = self.session.new_stream(client_id)

    def act(self, actions: List[Any]) -> None:
        for action in actions:
            if isinstance(action, act.Send):
                self.out.append((action.command, action.client_id, bytes(action.payload)))
            elif isinstance(action, act.OpenLocal):
                self.opened.append((action.client_id, action.address, action.port))
                self.add(action.client_id, action.early)
            elif isinstance(action, act.DropStream):
                del self.open[action.client_id]
            elif isinstance(action, act.Listened):
                self.listened += 1
            elif isinstance(action, act.Fail):
                self.failed = action.reason
            elif isinstance(action, act.Log):
                self.logs.append((action.level, action.message))
            else:
                self.logs.append((type(action).__name__, repr(action)))

    def receive(self, frame: Tuple[int, int, bytes], now: float) -> None:
        command, client_id, payload = frame
        if command == DATA and client_id in self.open:
            self.open[client_id] += payload          # the link's fast path
        elif command == CLOSE and client_id in self.open:
            del self.open[client_id]
            rules = self.rules.pop(client_id)
            rules.on_close(payload)
            self.act(self.session.peer_closed(rules, False, now))
        else:
            self.act(self.session.frame(command, client_id, payload, self.open, now))

    def close(self, client_id: int, now: float) -> None:
        """This side ends a stream: its CLOSE goes out."""
        del self.open[client_id]
        self.session.closed_here(client_id, now)
        self.out.append((CLOSE, client_id, b""))


def deliver(frm: Side, to: Side, now: float = 0.0) -> List[Tuple[int, int, bytes]]:
    frames, frm.out = frm.out, []
    for frame in frames:
        to.receive(frame, now)
    return frames


def pair(quarantine: float = 10.0):
    """A legacy session: the device skips the server's OFFER, as a Lua agent does,
    and the server takes it as legacy once its wait for a HELLO is over."""
    device = Side(wire.DeviceSession(protocol="legacy"))
    server = Side(ServerSession(ClientIds(quarantine), encode_connect_payload("", 23)))
    device.act(device.session.start(0.0))
    assert deliver(device, server) == [(LISTEN, 0, b"")]
    assert deliver(server, device) == [(OFFER, V2, b"")]
    assert server.listened == 0
    server.act(server.session.expire(server.session.next_deadline(), True))
    assert server.listened == 1 and server.session.established
    assert device.logs == [(DEBUG, 'OFFER of protocol v2 ignored: [device] protocol = "legacy"')]
    device.logs.clear()
    return device, server


def accept(server: Side, now: float = 0.0) -> int:
    client_id, actions = server.session.open(server.open, now)
    assert client_id is not None
    server.add(client_id)
    server.act(actions)
    return client_id


def test_a_client_session_end_to_end():
    device, server = pair()
    cid = accept(server)
    assert cid == 1 and server.out == [(CONNECT, 1, encode_connect_payload("", 23))]
    deliver(server, device)
    assert device.opened == [(1, "", 23)] and device.open == {1: bytearray()}
    server.out.append((DATA, 1, b"ls\n"))
    deliver(server, device)
    device.out.append((DATA, 1, b"file\n"))
    device.close(1, 0.1)                              # the service hung up
    assert deliver(device, server, 0.1) == [(DATA, 1, b"file\n"), (CLOSE, 1, b"")]
    assert server.open == {} and device.open == {}
    assert not server.failed and not device.failed and server.out == []   # no second CLOSE


def test_the_server_wants_listen_first():
    server = Side(ServerSession(ClientIds(), b""))
    server.receive((DATA, 3, b"GET /"), 0.0)
    assert server.failed == "DATA before LISTEN: not a tcprc device"
    server = Side(ServerSession(ClientIds(), b""))
    server.receive((CONNECT, 3, encode_connect_payload("", 23)), 0.0)
    assert server.failed == "CONNECT before LISTEN: not a tcprc device"


def test_a_repeated_listen_is_ignored_with_a_warning():
    device, server = pair()
    server.receive((LISTEN, 0, b""), 1.0)
    assert server.listened == 1 and server.logs == [(WARN, "repeated LISTEN ignored")]


def test_early_data_waits_for_its_connect():
    # The Java server's order: the client's first bytes, then its CONNECT.
    device, server = pair()
    device.receive((DATA, 7, b"hello"), 0.0)
    assert device.out == [] and device.open == {}
    assert device.session.next_deadline() == wire.EARLY_WAIT
    device.receive((CONNECT, 7, encode_connect_payload("", 23)), 0.5)
    assert device.open == {7: bytearray(b"hello")} and device.out == []
    assert device.session.next_deadline() is None


def test_early_data_with_no_connect_gets_one_close_and_a_stale_connect_opens_nothing():
    device, server = pair()
    device.receive((DATA, 8, b"x"), 0.0)
    device.act(device.session.expire(wire.EARLY_WAIT / 2, True))
    assert device.out == []                               # not yet
    device.act(device.session.expire(wire.EARLY_WAIT + 0.1, False))
    assert device.out == []                               # not reading: it waits longer
    device.act(device.session.expire(wire.EARLY_WAIT + 1.0, True))
    assert device.out == [(CLOSE, 8, b"")]
    device.out = []
    device.receive((DATA, 8, b"late"), 3.0)               # quiet: no second CLOSE
    device.receive((CONNECT, 8, encode_connect_payload("", 23)), 3.1)
    assert device.out == [] and device.open == {} and device.opened == []
    assert device.logs[-1][0] == DEBUG and "stale CONNECT" in device.logs[-1][1]
    device.receive((CLOSE, 8, b""), 3.2)                  # the server's answer ends the quiet time
    device.receive((CONNECT, 8, encode_connect_payload("", 23)), 3.3)
    assert device.open == {8: bytearray()}


def test_early_data_over_its_bound_is_refused_at_once():
    device, server = pair()
    device.receive((DATA, 9, bytes(wire.EARLY_PER_ID)), 0.0)
    assert device.out == []
    device.receive((DATA, 9, b"!"), 0.0)
    assert device.out == [(CLOSE, 9, b"")] and device.session.held_bytes() == 0


def test_a_connect_on_a_busy_id_replaces_the_stream_silently():
    device, server = pair()
    device.receive((CONNECT, 2, encode_connect_payload("", 23)), 0.0)
    device.open[2] += b"old"
    device.receive((CONNECT, 2, encode_connect_payload("", 23)), 1.0)
    assert device.open == {2: bytearray()} and device.out == []
    assert [o[0] for o in device.opened] == [2, 2]


def test_a_bad_connect_is_refused_with_close():
    device, server = pair()
    device.receive((CONNECT, 4, b"\x00\x09abc"), 0.0)
    assert device.out == [(CLOSE, 4, b"")] and device.open == {}
    assert device.logs[0][0] == WARN and device.logs[0][1].startswith("refused client 4:")


def test_unknown_close_and_data_are_dropped_without_an_answer():
    device, server = pair()
    device.receive((CLOSE, 5, b""), 0.0)
    server.receive((DATA, 5, b"late"), 0.0)
    server.receive((CLOSE, 6, b""), 0.0)
    assert device.out == [] and server.out == [] and not server.failed
    assert device.logs == [(DEBUG, "CLOSE for unknown client 5 ignored")]
    assert server.logs == [(DEBUG, "DATA for unknown client 5 dropped"),
                           (DEBUG, "CLOSE for unknown client 6 ignored")]


def test_an_id_the_server_closed_is_held_until_the_device_answers():
    # A legacy Lua device answers our CLOSE with its own, maybe after late DATA.
    device, server = pair()
    for _ in range(3):                      # seen to answer: the server trusts the answers
        cid = accept(server)
        deliver(server, device)
        server.close(cid, 0.0)
        deliver(server, device)
        device.out.append((CLOSE, cid, b""))
        deliver(device, server)
    assert server.session.ids.answering
    cid = accept(server, 1.0)
    deliver(server, device)
    server.close(cid, 1.0)
    deliver(server, device, 1.0)
    assert server.session.ids.is_held(cid)
    device.out.append((DATA, cid, b"late"))              # the old stream's last bytes
    deliver(device, server, 1.1)
    assert server.logs[-1] == (DEBUG, "DATA for unknown client %d dropped (held until "
                                           "the device's CLOSE)" % cid)
    for n in range(254):                                  # every other id is taken...
        accept(server, 1.2)
    assert server.session.open(server.open, 1.3) == (None, [])   # ...and this one is held
    device.out.append((CLOSE, cid, b""))                  # the answer frees it
    deliver(device, server, 1.4)
    assert server.logs[-1] == (DEBUG, "CLOSE for client %d answers ours: the id is free" % cid)
    assert server.session.open(server.open, 1.5)[0] == cid


def test_a_device_that_never_answers_gets_its_id_back_after_the_grace():
    device, server = pair()
    cid = accept(server)
    server.close(cid, 0.0)
    for n in range(254):
        accept(server, 0.0)
    assert server.session.open(server.open, 0.01) == (None, [])
    assert 0 < server.session.ids.wait <= wire.GRACE_FLOOR
    assert server.session.open(server.open, wire.GRACE_FLOOR + 0.01)[0] == cid


def test_reset_forgets_every_id():
    device, server = pair()
    device.receive((DATA, 3, b"x"), 0.0)
    device.session.reset()
    assert device.session.next_deadline() is None and device.session.held_bytes() == 0


def test_a_hello_too_late_leaves_both_ends_legacy():
    """The server's wait for HELLO ran out and a client came first: the server
    ignores the late HELLO, and an auto device, seeing CONNECT where it waited
    for CHALLENGE, stays legacy instead of hanging up (and redialing into the
    same race); a device that must speak v2 hangs up."""
    from tcprc.wire.frames import HELLO
    device = Side(wire.DeviceSession())
    server = Side(ServerSession(ClientIds(10.0), encode_connect_payload("", 23)))
    device.act(device.session.start(0.0))
    deliver(device, server)
    offer = server.out
    server.out = []
    server.act(server.session.expire(server.session.next_deadline(), True))   # legacy now
    accept(server)                                                          # a client came
    connect = server.out
    server.out = offer + connect
    deliver(server, device)                  # OFFER -> HELLO, then the CONNECT
    assert device.failed == "" and device.opened and device.session.state.value == "legacy"
    assert [frame[0] for frame in device.out] == [HELLO]
    deliver(device, server)
    assert server.failed == "" and server.session.state.value == "legacy"
    assert any("stays legacy" in text for _, text in server.logs)

    strict = Side(wire.DeviceSession(protocol="v2"))
    strict.act(strict.session.start(0.0))
    strict.out = []
    for frame in offer + connect:
        strict.receive(frame, 0.0)
    assert strict.failed == "CONNECT during the v2 handshake" and not strict.opened


def test_handshake_frames_without_an_offer_are_unknown_commands_never_answered():
    """A legacy server's garbage can hold a REJECT or a CHALLENGE: before an OFFER
    (and on a legacy uplink) they are skipped, and no v2 frame goes back."""
    from tcprc.wire import frames as f
    for protocol in ("auto", "legacy"):
        device = Side(wire.DeviceSession(protocol=protocol))
        device.act(device.session.start(0.0))
        device.out = []
        for command in (f.REJECT, f.CHALLENGE, f.WELCOME, f.AUTH):
            device.receive((command, 0, b"\x01garbage"), 0.0)
        assert device.failed == "" and device.out == []
        assert all(kind == WARN and "skipped unknown command" in text
                   for kind, text in device.logs)
    server = Side(ServerSession(ClientIds(10.0), encode_connect_payload("", 23)))
    server.receive((f.AUTH, 0, b""), 0.0)
    assert server.failed == "AUTH before LISTEN: not a tcprc device" and server.out == []


def test_the_protocol_document_shows_the_state_tables_the_code_follows():
    import os
    from support import ROOT
    from tcprc.wire.states import markdown
    with open(os.path.join(ROOT, "docs", "protocol.md")) as handle:
        doc = handle.read()
    begin = doc.index("<!-- states: generated by scripts/protocol-tables")
    begin = doc.index("\n", begin) + 1
    end = doc.index("<!-- end of states -->")
    assert doc[begin:end] == markdown(), "run scripts/protocol-tables --write"


def test_the_protocol_document_lists_the_reject_codes_the_code_has():
    """docs/protocol.md's REJECT table: every code of wire.frames, by its name, and no other."""
    import os
    import re
    from support import ROOT
    from tcprc.wire.frames import REJECT_CODES
    with open(os.path.join(ROOT, "docs", "protocol.md")) as handle:
        text = handle.read()
    table = text[text.index("REJECT codes:"):].split("\n\n")[1]
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \|", table, re.M)
    assert {int(code): name for code, name in rows} == REJECT_CODES


def test_the_modules_a_device_loads_hold_no_server_code():
    # A device imports wire.session and wire.handshake; the server's halves live
    # in modules of their own so that it does not load them (docs/benchmarks.md,
    # "Third round").
    from tcprc.wire import handshake
    assert not hasattr(wire, "ServerSession") and not hasattr(handshake, "ServerHandshake")
