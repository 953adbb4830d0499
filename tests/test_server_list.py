"""A device with a list of servers ([device] server = [...], --server repeated): one
uplink at a time, the list tried in order, the next server after a failed dial or a
lost session, a backoff after a full round, then from the first again."""

import os
import re
import socket
import subprocess
import sys
from typing import List

import pytest

from support import ROOT
from support.agents import run_tcprc
from support.net import free_port
from support.tunnel import settings, start_server
from support.waiting import wait_for
from tcprc.device.app import DeviceApp
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config, load_config
from tcprc.ops.ctl import send_command


def dead_addresses(count: int) -> List[str]:
    """`count` different ADDR:PORT where nothing listens (ports no connect() is given)."""
    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return ["127.0.0.1:%d" % port for port in sorted(ports)]


def dead_address() -> str:
    return dead_addresses(1)[0]


def address(app) -> str:
    return "%s:%d" % app.listen_address


def start_device(servers, target, **keys):
    app = DeviceApp(settings("device", **dict({
        "server": servers, "local": "%s:%d" % target,
        "reconnect_min": 0.05, "reconnect_max": 0.5}, **keys)))
    app.start()
    return app


def round_trip(host) -> None:
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"


def failed_dials(caplog):
    """The servers whose dial failed, in order, as the device logged them."""
    return [m.group(1) for m in (re.match(r"connect to (\S+) failed", r.getMessage())
                                 for r in caplog.records) if m]


def test_the_second_server_takes_the_device_and_the_third_when_the_second_stops(service, caplog):
    first = dead_address()
    second, third = start_server(), start_server()
    device = start_device([first, address(second), address(third)], service.address)
    revived = None
    try:
        wait_for(lambda: second.host_address, what="the device on the second server")
        round_trip(second.host_address)
        status = device.status()
        assert status["server"] == address(second)
        assert status["servers"] == ", ".join([first, address(second), address(third)])
        assert failed_dials(caplog) == [first]
        # The first comes back: a session lost moves on to the NEXT server, not the first.
        revived = start_server(listen=first)
        second.close()
        wait_for(lambda: third.host_address, what="the device on the third server", timeout=10)
        round_trip(third.host_address)
        assert device.status()["server"] == address(third)
        assert revived.host_address is None
        assert device.status()["last_error"].startswith(address(second) + ": ")   # names it
    finally:
        device.close()
        for app in (second, third, revived):
            if app is not None:
                app.close()


def test_a_healthy_session_lost_goes_to_the_next_server_and_wraps_around(service, caplog):
    servers = [start_server() for _ in range(3)]
    device = start_device([address(app) for app in servers], service.address, healthy_after=0.2)
    try:
        wait_for(lambda: servers[0].host_address, what="the device on the first server")
        wait_for(lambda: (device.status()["uptime"] or 0) >= 0.3, what="a healthy session")
        servers[0].close()
        # The next after a lost session: the second (the first is gone anyway), then
        # after losing the second while the first is back, the third, not the first.
        wait_for(lambda: servers[1].host_address, what="the device on the second server")
        servers[0] = start_server(listen=address(servers[0]))
        wait_for(lambda: (device.status()["uptime"] or 0) >= 0.3, what="a healthy session")
        servers[1].close()
        wait_for(lambda: servers[2].host_address, what="the device on the third server")
        assert servers[0].host_address is None
        wait_for(lambda: (device.status()["uptime"] or 0) >= 0.3, what="a healthy session")
        servers[2].close()
        # After the last, the list wraps: the first again.
        wait_for(lambda: servers[0].host_address, what="the device back on the first server")
        round_trip(servers[0].host_address)
        assert failed_dials(caplog) == []    # each move went straight to a live server
    finally:
        device.close()
        for app in servers:
            app.close()


def test_a_full_round_of_failures_backs_off_then_starts_from_the_first(service, caplog):
    dead = dead_addresses(3)
    device = start_device(dead, service.address, reconnect_min=0.2, reconnect_max=0.4)
    revived = None
    try:
        # Observable in status: the backoff comes after the last of the round.
        status = wait_for(lambda: (lambda s: s if s["state"] == "backoff" else None)(
            device.status()), what="the backoff after a round")
        assert status["server"] == dead[2] and dead[2] in status["last_error"]
        wait_for(lambda: len(failed_dials(caplog)) >= 7, what="two rounds and a bit")
        dials = failed_dials(caplog)
        assert dials[:7] == dead + dead + dead[:1]
        # ... and in the log: one backoff line per round, between the last and the first.
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "tcprc.device" and ("connect to" in r.getMessage()
                                                  or "backing off" in r.getMessage())]
        backoffs = [n for n, line in enumerate(lines) if "backing off" in line]
        assert backoffs[:2] == [3, 7], lines[:9]
        assert "no server of 3 kept an uplink: backing off, from the first, %s" % dead[0] \
            in lines[3]
        # The first answers again: the device is back through it.
        revived = start_server(listen=dead[0])
        wait_for(lambda: revived.host_address, what="the device on the first server", timeout=10)
        round_trip(revived.host_address)
        assert device.status()["state"] == "up" and device.status()["server"] == dead[0]
    finally:
        device.close()
        if revived is not None:
            revived.close()


def test_a_round_begun_after_a_healthy_session_backs_off_then_starts_from_the_first(
        service, caplog):
    first, third = dead_addresses(2)
    second = start_server()
    device = start_device([first, address(second), third], service.address, healthy_after=0.2,
                          reconnect_min=0.1, reconnect_max=0.2)
    try:
        wait_for(lambda: second.host_address, what="the device on the second server")
        wait_for(lambda: (device.status()["uptime"] or 0) >= 0.3, what="a healthy session")
        second.close()
        # The round after the session: third, first, second; then from the first.
        wait_for(lambda: len(failed_dials(caplog)) >= 7, what="a round and another")
        assert failed_dials(caplog)[:7] == [first, third, first, address(second),
                                            first, address(second), third]
    finally:
        device.close()
        second.close()


def test_one_server_as_a_string_keeps_its_old_status_and_errors(service):
    server = start_server()
    device = start_device(address(server), service.address)
    try:
        wait_for(lambda: server.host_address, what="the device's LISTEN")
        status = device.status()
        assert status["server"] == address(server) and "servers" not in status
        assert device.settings.server == (address(server),)
        server.close()
        error = wait_for(lambda: device.status()["last_error"], what="the uplink to end")
        assert error.startswith("uplink lost: ")   # no server in front: there is one
    finally:
        device.close()


def test_tcpremoteconnect_with_a_server_replaces_the_list_until_the_next_plain_one(service):
    listed, other = start_server(), start_server()
    cfg = build_config("device", {"device": {
        "server": [dead_address(), address(listed)], "local": "%s:%d" % service.address,
        "reconnect_min": 0.05, "reconnect_max": 0.5}}, "test")
    device = DeviceApp(cfg.device)
    device.start()
    parser = CommandParser(device, cfg)
    try:
        wait_for(lambda: listed.host_address, what="the device on the listed server")
        host, port = other.listen_address
        assert parser.execute("TCPRemoteConnect %s %d" % (host, port)) == ["OK"]
        wait_for(lambda: other.host_address and not listed.host_address,
                 what="the device on the server given")
        lines = parser.execute("status")
        assert "server: %s" % address(other) in lines and not any(
            line.startswith("servers:") for line in lines)
        assert parser.execute("TCPRemoteConnect") == ["OK"]
        wait_for(lambda: listed.host_address and not other.host_address,
                 what="the device back on the list")
        assert any(line.startswith("servers: ") for line in parser.execute("status"))
    finally:
        device.close()
        listed.close()
        other.close()


def test_config_set_get_save_of_a_list_round_trips(tmp_path, service):
    path = tmp_path / "device.toml"
    path.write_text("# hall 3\n[device]\nautostart = false\nserver = \"192.0.2.1:9000\"\n")
    cfg = load_config(str(path), "device")
    device = DeviceApp(cfg.device)
    device.start()
    parser = CommandParser(device, cfg)
    try:
        assert parser.execute("config get device.server") == [
            'device.server = "192.0.2.1:9000"', "OK"]
        assert parser.execute("config set device.server 192.0.2.1:9000 192.0.2.2:9000,"
                              "192.0.2.3:9000") == [
            'device.server = ["192.0.2.1:9000", "192.0.2.2:9000", "192.0.2.3:9000"]: applied: '
            'a running tunnel redials with it', "OK"]
        assert device.settings.server == ("192.0.2.1:9000", "192.0.2.2:9000", "192.0.2.3:9000")
        assert parser.execute("config get device.server") == [
            'device.server = ["192.0.2.1:9000", "192.0.2.2:9000", "192.0.2.3:9000"]', "OK"]
        assert parser.execute("config save")[-1] == "OK"
        text = path.read_text()
        assert 'server = ["192.0.2.1:9000", "192.0.2.2:9000", "192.0.2.3:9000"]' in text
        assert "# hall 3" in text
        assert load_config(str(path), "device").device.server == device.settings.server
        # One server is written as a string again; "" is none.
        assert parser.execute("config set device.server 192.0.2.9:9000") == [
            'device.server = "192.0.2.9:9000": applied: a running tunnel redials with it', "OK"]
        assert parser.execute("config save")[-1] == "OK"
        assert 'server = "192.0.2.9:9000"\n' in path.read_text()
        assert parser.execute('config set device.server ""') == [
            'device.server = "": applied: a running tunnel redials with it', "OK"]
        assert parser.execute("config get device.server") == ['device.server = ""', "OK"]
        assert device.settings.server == ()
        # A bad entry: one error naming it, the value as it was.
        lines = parser.execute("config set device.server 192.0.2.1:9000 nowhere")
        assert lines == ["ERROR device.server: entry 2: expected ADDR:PORT, got 'nowhere' "
                         "(no port)"]
        assert device.settings.server == ()
    finally:
        device.close()


@pytest.mark.e2e
def test_server_repeated_on_the_command_line_dials_each_in_turn(agents, service):
    dead = dead_address()
    live = start_server()
    try:
        proc = agents.start("device", "--server", dead, "--server", address(live),
                            "--local", "%s:%d" % service.address,
                            config="[device]\nserver = \"192.0.2.1:9000\"\n"
                                   "reconnect_min = 0.05\nreconnect_max = 0.5\n")
        wait_for(lambda: live.host_address or proc.poll() is not None, what="the device")
        assert proc.poll() is None, agents.log(proc)
        round_trip(live.host_address)
        lines = send_command(proc.control_socket, "status", 5.0)
        assert "server: %s" % address(live) in lines
        assert "servers: %s, %s" % (dead, address(live)) in lines   # the file's gave way
        assert "connect to %s failed" % dead in agents.log(proc)
        assert "192.0.2.1" not in agents.log(proc)
    finally:
        live.close()


@pytest.mark.e2e
@pytest.mark.parametrize("content, args, expected", [
    ("", ["--server", "127.0.0.1:9000", "--server", "nowhere"],
     "tcprc: --server: entry 2: expected ADDR:PORT, got 'nowhere' (no port)"),
    ("", ["--server", "127.0.0.1:9000", "--server", "127.0.0.1:9000"],
     "tcprc: --server: entry 2: 127.0.0.1:9000 is listed twice"),
    ('[device]\nserver = ["127.0.0.1:9000", "b:0"]\n', [],
     "bad.toml: [device] server entry 2: port 0 is out of range 1..65535"),
    ('[device]\nserver = ["127.0.0.1:9000", 9001]\n', [],
     "bad.toml: [device] server entry 2 must be a string \"ADDR:PORT\", got 9001"),
    ('[device]\nserver = 9000\n', [], "bad.toml: [device] server must be a string or a list, "
                                      "got 9000"),
])
def test_a_bad_entry_is_one_line_naming_it_and_exit_2(tmp_path, content, args, expected):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_tcprc("device", "-c", str(path), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcprc: ") and lines[0].endswith(expected), \
        result.stderr


@pytest.mark.e2e
@pytest.mark.bench
def test_the_failover_bench_runs_and_every_device_comes_back():
    bench = os.path.join(ROOT, "scripts", "failover-bench")
    proc = subprocess.run([sys.executable, bench, "-n", "5", "--rounds", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| list")
            or line.startswith("| one server")]
    assert len(rows) == 2 and all("p50" in row and "not back" not in row for row in rows), \
        proc.stdout
