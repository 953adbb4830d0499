"""The server's uplink port under attack: fair pending slots, bounded logs, allow_from.

Real sockets on loopback; 127.0.0.2 plays the attacker's address, 127.0.0.1
the device's.
"""

import os
import re
import select
import socket
import threading
import time

import pytest

from support.agents import run_tcprc
from support.net import is_eof, recv_exactly
from support.services import Service
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.addr import address_in, parse_network
from tcprc.device.app import DeviceApp
from tcprc.wire.frames import CONNECT, DATA, LISTEN

ATTACKER = "127.0.0.2"


def dial(address, source=ATTACKER):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(address)
    return sock


def lines_about(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


class Flood(threading.Thread):
    """Holds `count` idle connections on the uplink port from 127.0.0.2 and
    reopens each one the server drops, at most 200 a second, until stopped
    or `seconds` have passed."""

    def __init__(self, address, count, seconds=20.0):
        super().__init__(daemon=True)
        self.address, self.count, self.seconds = address, count, seconds
        self.filled = threading.Event()
        self.stopping = threading.Event()
        self.reopened = 0

    def run(self):
        socks = [dial(self.address) for _ in range(self.count)]
        self.filled.set()
        deadline = time.monotonic() + self.seconds
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                readable, _, _ = select.select(socks, [], [], 0.05)
                for sock in readable:
                    try:
                        alive = sock.recv(64)
                    except OSError:
                        alive = b""
                    if alive:
                        continue
                    sock.close()
                    socks.remove(sock)
                    time.sleep(0.005)   # pacing the attack, not synchronisation
                    socks.append(dial(self.address))
                    self.reopened += 1
        finally:
            for sock in socks:
                sock.close()


# ---------------------------------------------------------------- item 6: fair pending slots
@pytest.mark.parametrize("keys", [
    {"max_pending": 8, "max_pending_per_source": 4},    # the per-source cap saves the device
    {"max_pending": 4, "max_pending_per_source": 64},   # the global eviction does
], ids=["per-source", "table-full"])
def test_a_flood_of_idle_connections_cannot_lock_a_device_out(server, keys):
    service = Service("echo")
    app = server(listen_timeout=30, **keys)
    flood = Flood(app.listen_address, keys["max_pending"])
    flood.start()
    device = None
    try:
        assert flood.filled.wait(10)
        # Every waiting slot is the attacker's before the device dials.
        wait_for(lambda: sum(1 for link in list(app._links) if ATTACKER in link.name)
                 >= min(keys.values()), what="the flood to hold its slots")
        device = DeviceApp(settings("device", server="%s:%d" % app.listen_address,
                                    local="%s:%d" % service.address,
                                    reconnect_min=0.05, reconnect_max=0.5))
        device.start()
        wait_for(lambda: app.host_address, timeout=5, what="the device's LISTEN through the flood")
        client = socket.create_connection(app.host_address, timeout=10)
        client.sendall(b"through")
        assert recv_exactly(client, 7) == b"through"
        client.close()
        wait_for(lambda: flood.reopened > 0, what="the flood's connections dropped to make room")
        assert flood.is_alive(), "the flood still ran while the device got in"
    finally:
        flood.stopping.set()
        flood.join(10)
        if device is not None:
            device.close()
        service.close()


def test_over_its_cap_a_source_loses_its_own_oldest_waiting_connection(server, caplog):
    app = server(listen_timeout=30, max_pending_per_source=2)
    first, second = dial(app.listen_address), dial(app.listen_address)
    other = dial(app.listen_address, source="127.0.0.1")
    wait_for(lambda: len(app._links) == 3, what="3 waiting uplinks")
    third = dial(app.listen_address)
    assert is_eof(first), "the source's oldest makes room"
    wait_for(lambda: lines_about(caplog, "max_pending_per_source = 2"), what="the log line")
    for sock in (second, third, other):
        assert not is_eof(sock, timeout=0.2)
    # Whoever LISTENs is no longer waiting: it does not count against the cap.
    second.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: app.host_address, what="the LISTEN")
    fourth = dial(app.listen_address)
    wait_for(lambda: lines_about(caplog, "uplink from %s:%d accepted" % (ATTACKER, fourth.getsockname()[1])),
             what="the fourth accepted")
    assert not is_eof(second, timeout=0.2) and not is_eof(third, timeout=0.2)
    for sock in (second, third, fourth, other):
        sock.close()


# ---------------------------------------------------------------- item 7: bounded log lines
HAMMER = [
    b"",                                                   # connect and close
    os.urandom(64),                                        # garbage
    protocol.encode(CONNECT, 1, b"\x00\x00\x00\x17"),      # CONNECT before LISTEN
    protocol.encode(200, 1, b"x") * 20,                    # unknown commands
    protocol.encode(DATA, 1, b"x"),                        # DATA before LISTEN
    protocol.encode(LISTEN, 0) * 3,                        # LISTEN (taking the tunnel), repeated
]


def test_one_hammering_source_logs_a_bounded_number_of_lines(server, caplog):
    app = server(max_pending=4, listen_timeout=0.3)
    started = time.monotonic()
    held = []
    for n in range(300):
        sock = dial(app.listen_address)
        sock.sendall(HAMMER[n % len(HAMMER)])
        if n % 7 == 0:
            held.append(sock)          # some stay: the pending table fills
            if len(held) > 8:
                held.pop(0).close()
        else:
            sock.close()
    for sock in held:
        sock.close()
    wait_for(lambda: not app._links, timeout=20, what="every hammer connection to end")
    # Another source is heard although the hammering one spent its share.
    device = dial(app.listen_address, source="127.0.0.1")
    device.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: lines_about(caplog, "uplink 127.0.0.1:%d: LISTEN" % device.getsockname()[1]),
             what="the device's LISTEN line")
    elapsed = time.monotonic() - started
    noisy = lines_about(caplog, ATTACKER)
    # A burst of 10, then 1 line a second; suppressed lines are counted, not lost.
    assert len(noisy) <= 10 + elapsed + 1, (len(noisy), elapsed)
    assert any("similar lines from this source suppressed" in line for line in noisy)
    device.close()


# ---------------------------------------------------------------- item 8: allow_from
def test_allow_from_closes_other_sources_at_once_and_lets_the_device_in(server, caplog):
    app = server(allow_from=["127.0.0.1/32", "10.0.0.0/8"])
    assert not lines_about(caplog, "accepted from anywhere")
    intruder = dial(app.listen_address)
    intruder.sendall(protocol.encode(LISTEN, 0))
    assert is_eof(intruder, timeout=5)
    wait_for(lambda: lines_about(caplog, "uplink from %s:%d refused: not in allow_from"
                                 % (ATTACKER, intruder.getsockname()[1])), what="the refusal line")
    assert app.host_address is None
    device = dial(app.listen_address, source="127.0.0.1")
    device.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: app.host_address, what="the allowed device's LISTEN")
    intruder.close()
    device.close()


def test_default_allow_from_warns_once_at_start(server, caplog):
    server()
    assert len(lines_about(caplog, "legacy uplinks are accepted from anywhere")) == 1


def test_ipv4_mapped_sources_match_ipv4_networks(server, caplog):
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as handle:
            if handle.read().strip() != "0":
                pytest.skip("IPv6 sockets are v6-only here")
    except OSError:
        pytest.skip("no IPv6")
    app = server(listen="[::]:0", allow_from=["127.0.0.1/32"])
    port = app.listen_address[1]
    intruder = dial(("127.0.0.1", port))
    assert is_eof(intruder, timeout=5)
    wait_for(lambda: lines_about(caplog, "[::ffff:127.0.0.2]:%d refused" % intruder.getsockname()[1]),
             what="the refusal of the mapped source")
    v6 = socket.create_connection(("::1", port), timeout=10)
    assert is_eof(v6, timeout=5), "::1 is not in an IPv4-only allow_from"
    device = dial(("127.0.0.1", port), source="127.0.0.1")
    device.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: app.host_address, what="the mapped device's LISTEN")
    for sock in (intruder, v6, device):
        sock.close()


def test_narrowing_allow_from_at_run_time_drops_an_uplink_now_outside(server, caplog):
    app = server()
    device = dial(app.listen_address, source="127.0.0.1")
    device.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: app.host_address, what="LISTEN")
    app.apply_settings(settings("server", listen=app.settings.listen, host=app.settings.host,
                                allow_from=["127.0.0.2/32"]))
    assert is_eof(device, timeout=5)
    wait_for(lambda: lines_about(caplog, "source no longer in allow_from"), what="the log line")
    device.close()


@pytest.mark.parametrize("takeover, ended, line", [
    (False, "rival", "LISTEN refused: the tunnel belongs to"),
    (True, "device", "LISTEN takes over the tunnel from"),
])
def test_takeover_lines_name_both_sources(server, caplog, takeover, ended, line):
    app = server(takeover=takeover)
    device = dial(app.listen_address, source="127.0.0.1")
    device.sendall(protocol.encode(LISTEN, 0))
    wait_for(lambda: app.host_address, what="LISTEN")
    rival = dial(app.listen_address)
    rival.sendall(protocol.encode(LISTEN, 0))
    assert is_eof(rival if ended == "rival" else device, timeout=5)
    wanted = "uplink %s:%d: %s uplink 127.0.0.1:%d" % (
        ATTACKER, rival.getsockname()[1], line, device.getsockname()[1])
    wait_for(lambda: lines_about(caplog, wanted), what="the %s line" % line)
    rival.close()
    device.close()


@pytest.mark.e2e
@pytest.mark.parametrize("entry, problem", [
    ("10.0.0.1/8", "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
    ("10.0.0.0/33", "'10.0.0.0/33': the prefix length must be 0..32"),
    ("example.org", "'example.org' is not an IP address"),
    ("2001:db8::1/32", "has host bits set (did you mean 2001:db8::/32?)"),
])
def test_a_bad_allow_from_entry_stops_the_start_in_one_line(tmp_path, entry, problem):
    path = tmp_path / "server.toml"
    path.write_text('[server]\nallow_from = ["127.0.0.1/32", "%s"]\n' % entry)
    result = run_tcprc("server", "-c", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("tcprc: %s: [server] allow_from " % path), lines[0]
    assert problem in lines[0], lines[0]


@pytest.mark.e2e
def test_an_empty_allow_from_is_refused(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[server]\nallow_from = []\n")
    result = run_tcprc("server", "-c", str(path))
    assert result.returncode == 2 and re.search(r"allow_from must name at least one network",
                                                result.stderr), result.stderr


@pytest.mark.parametrize("host, inside", [
    ("10.1.2.3", True), ("11.0.0.1", False), ("::ffff:10.9.9.9", True),
    ("2001:db8::5", True), ("2001:db9::5", False), ("fe80::1%lo", False), ("::1", False),
])
def test_network_matching(host, inside):
    networks = [parse_network(n) for n in ("10.0.0.0/8", "2001:db8::/32")]
    assert address_in(host, networks) is inside
    mapped = [parse_network("::ffff:10.0.0.0/104")]   # the same as 10.0.0.0/8
    assert address_in(host, mapped) is (host in ("10.1.2.3", "::ffff:10.9.9.9"))
