"""The fleet server (issue 13): the device table and its commands, devices_dir,
per-device limits; over real sockets, real threads."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from support import ROOT
from support.net import free_port, recv_exactly
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.device.app import DeviceApp
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config
from tcprc.ops.control import ControlServer
from tcprc.ops.ctl import send_command
from tcprc.ops.devdir import DeviceFiles
from tcprc.server.app import ServerApp

SECRET = "correct-horse-battery-staple-42"
OTHER = "a-different-secret-of-enough-bits"


def _server(devices=None, **keys):
    base = {"listen": "127.0.0.1:0", "host": "127.0.0.1:0"}
    if devices is not None:
        base["devices"] = devices
    base.update(keys)
    app = ServerApp(settings("server", **base), device_files=DeviceFiles)
    app.start()
    return app


def _device(server_app, target, **keys):
    base = {"server": "%s:%d" % server_app.listen_address, "local": "%s:%d" % target,
            "reconnect_min": 0.05, "reconnect_max": 0.5}
    base.update(keys)
    app = DeviceApp(settings("device", **base))
    app.start()
    return app


def _round_trip(host, data=b"ping through the fleet"):
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(data)
        assert recv_exactly(conn, len(data)) == data


def _row(app, ident):
    return {row["id"]: row for row in app.devices()}.get(ident)


@pytest.fixture
def fleet(service, tmp_path):
    """A server with gw1 and gw2 configured and legacy sessions allowed; gw1 and an
    identity-less device are up, gw2 is not; its commands on a control socket."""
    devices = {"gw1": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()},
               "gw2": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()}}
    app = _server(devices, legacy=True)
    gw1 = _device(app, service.address, id="gw1", secret=SECRET)
    anon = _device(app, service.address)
    wait_for(lambda: app.device_host_address("gw1") and app.host_address, what="both sessions")
    parser = CommandParser(app, build_config("server", {}, "test"))
    control = ControlServer(parser, str(tmp_path / "server.sock"))
    control.start()
    yield app, parser, control.path if hasattr(control, "path") else str(tmp_path / "server.sock")
    control.close()
    gw1.close()
    anon.close()
    app.close()


# ---- item 1: devices, device ID, kick ID ----------------------------------------------

def test_devices_lists_every_configured_device_and_the_shared_session(fleet):
    app, _, path = fleet
    _round_trip(app.device_host_address("gw1"), b"x" * 1000)
    wait_for(lambda: _row(app, "gw1")["bytes_down"] >= 1000, what="gw1's bytes counted")
    lines = send_command(path, "devices", 5)
    assert lines[-1] == "OK"
    by_id = {line.split()[0]: line.split() for line in lines[1:-2]}
    assert set(by_id) == {"gw1", "gw2", ":legacy"}
    assert by_id["gw1"][1] == "up" and by_id["gw1"][2].startswith("127.0.0.1:")
    assert by_id["gw2"][1:3] == ["down", "-"]
    assert by_id[":legacy"][1] == "up"
    assert lines[-2] == "3 device(s), 2 up"
    row = _row(app, "gw1")
    assert row["sessions"] == 1 and row["protocol"] == "v2" and row["rtt"] is not None
    assert row["bytes_up"] >= 1000 and row["host"] == "%s:%d" % app.device_host_address("gw1")


def test_device_shows_details_and_counts_auth_failures(fleet, service):
    app, parser, path = fleet
    bad = _device(app, service.address, id="gw2", secret=OTHER, reconnect_min=30,
                  reconnect_max=30)
    try:
        wait_for(lambda: _row(app, "gw2")["auth_failures"] == 1, what="gw2's failure recorded")
    finally:
        bad.close()
    lines = send_command(path, "device gw2", 5)
    details = dict(line.split(": ", 1) for line in lines[:-1])
    assert details["state"] == "down" and details["auth_failures"] == "1"
    assert "authentication failed" in details["last_error"] and SECRET not in "".join(lines)
    assert send_command(path, "device nosuch", 5)[-1].startswith("ERROR no device 'nosuch'")


def test_kick_closes_a_session_and_the_device_redials(fleet):
    app, _, path = fleet
    first = _row(app, "gw1")["source"]
    assert send_command(path, "kick gw1", 5)[-1] == "OK"
    wait_for(lambda: _row(app, "gw1")["sessions"] == 2 and _row(app, "gw1")["state"] == "up",
             what="gw1 back after the kick")
    row = _row(app, "gw1")
    assert row["source"] != first and row["last_error"] == "kicked by the operator"
    assert send_command(path, "kick gw2", 5)[-1] == "ERROR device gw2 has no session to close"


def test_the_fleet_commands_answer_on_the_serial_console_too(fleet):
    serial = pytest.importorskip("serial")
    del serial
    from test_console import PROMPT, Terminal
    from tcprc.ops.console import SerialConsole
    app, parser, _ = fleet
    terminal = Terminal()
    console = SerialConsole(parser, terminal.path, 115200, True, PROMPT.decode())
    console.start()
    try:
        terminal.expect(PROMPT)
        lines = terminal.command("devices")
        assert lines[-1] == "OK" and any(line.startswith("gw1 ") for line in lines)
        assert terminal.command("kick gw1")[-1] == "OK"
    finally:
        console.close()
        terminal.close()
