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
from support.tunnel import settings, start_device, start_server
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
    if devices is not None:
        keys["devices"] = devices
    return start_server({"device_files": DeviceFiles}, **keys)


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
    gw1 = start_device(app, service.address, id="gw1", secret=SECRET)
    anon = start_device(app, service.address)
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
    bad = start_device(app, service.address, id="gw2", secret=OTHER, reconnect_min=30,
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


# ---- item 2: devices_dir and `ctl device add` -------------------------------------------

def _write(path, text):
    """Replace a file whole (a rename), as an editor or a deploy tool does; mode 0600,
    as a file holding a secret must be."""
    temp = str(path) + ".part"
    with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    os.replace(temp, str(path))


def _dir_server(tmp_path, scan=0.1, **keys):
    """A server reading tmp_path/devices every `scan` seconds."""
    folder = tmp_path / "devices"
    folder.mkdir(exist_ok=True)
    ServerApp.SCAN_INTERVAL, old = scan, ServerApp.SCAN_INTERVAL
    try:
        app = _server(devices_dir=str(folder), **keys)
    finally:
        ServerApp.SCAN_INTERVAL = old
    app.SCAN_INTERVAL = scan
    return app, folder


def _refused(address):
    try:
        socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_dropped_file_adds_a_device_an_edit_moves_it_a_removal_closes_it(tmp_path, service,
                                                                          caplog):
    app, folder = _dir_server(tmp_path)
    first, second = free_port(), free_port()
    device = start_device(app, service.address, id="gw3", secret=SECRET)
    try:
        _write(folder / "gw3.toml", 'host = "127.0.0.1:%d"\nsecret = "%s"\n' % (first, SECRET))
        wait_for(lambda: app.device_host_address("gw3") == ("127.0.0.1", first),
                 what="gw3 up on its port from the file")
        _round_trip(("127.0.0.1", first))
        _write(folder / "gw3.toml", 'host = "127.0.0.1:%d"\nsecret = "%s"\n' % (second, SECRET))
        wait_for(lambda: app.device_host_address("gw3") == ("127.0.0.1", second),
                 what="gw3 restarted on the edited port")
        _round_trip(("127.0.0.1", second))
        assert _refused(("127.0.0.1", first))
        os.unlink(str(folder / "gw3.toml"))
        wait_for(lambda: _row(app, "gw3") is None and app.device_host_address("gw3") is None,
                 what="gw3 gone")
        wait_for(lambda: _refused(("127.0.0.1", second)), what="gw3's port released")
        assert "device gw3 removed from the configuration" in caplog.text
        assert SECRET not in caplog.text
    finally:
        device.close()
        app.close()


def test_a_broken_file_is_one_line_and_the_others_keep_working(tmp_path, service, caplog):
    app, folder = _dir_server(tmp_path)
    port = free_port()
    device = start_device(app, service.address, id="gw4", secret=SECRET)
    try:
        _write(folder / "gw4.toml", 'host = "127.0.0.1:%d"\nsecret = "%s"\n' % (port, SECRET))
        _write(folder / "bad.toml", 'host = "127.0.0.1:%d"\nsecret = "%s' % (free_port(), OTHER))
        _write(folder / "short.toml", 'host = "127.0.0.1:%d"\nsecret = "tooshort"\n'
               % free_port())
        wait_for(lambda: app.device_host_address("gw4"), what="gw4 up beside broken files")
        _round_trip(app.device_host_address("gw4"))
        wait_for(lambda: len([r for r in caplog.records if "skipped" in r.getMessage()]) == 2,
                 what="one line per broken file")
        for _ in range(3):   # more scans: no more lines about the same files
            scans = app.scans
            wait_for(lambda: app.scans > scans + 1, what="two more scans")
        lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(lines) == 2, lines
        assert any("bad.toml: invalid TOML" in line for line in lines)
        assert any("short.toml: secret is shorter than 128 bits" in line for line in lines)
        assert OTHER not in caplog.text and "tooshort" not in caplog.text
        assert {row["id"] for row in app.devices()} == {"gw4"}
    finally:
        device.close()
        app.close()


def test_an_id_in_both_places_takes_the_config_file_table(tmp_path, service, caplog):
    configured = free_port()
    app, folder = _dir_server(tmp_path, devices={
        "gw5": {"secret": SECRET, "host": "127.0.0.1:%d" % configured}})
    _write(folder / "gw5.toml", 'host = "127.0.0.1:%d"\nsecret = "%s"\n' % (free_port(), OTHER))
    app.apply_settings(app.settings)   # what SIGHUP does
    device = start_device(app, service.address, id="gw5", secret=SECRET)
    try:
        wait_for(lambda: app.device_host_address("gw5") == ("127.0.0.1", configured),
                 what="gw5 on the config file's port, with its secret")
        lines = [r.getMessage() for r in caplog.records
                 if "in [server.devices] and in devices_dir" in r.getMessage()]
        assert len(lines) == 1, lines
    finally:
        device.close()
        app.close()


def test_a_file_with_the_status_pages_port_is_skipped_with_one_line(tmp_path, service, caplog):
    http = free_port()
    app, folder = _dir_server(tmp_path, http="127.0.0.1:%d" % http)
    try:
        _write(folder / "gw9.toml", 'host = "0.0.0.0:%d"\nsecret = "%s"\n' % (http, SECRET))
        app.apply_settings(app.settings)   # what SIGHUP does
        line = "devices_dir: device gw9 skipped: its host 0.0.0.0:%d is the port of [server] " \
               "http\n" % http
        wait_for(lambda: line in caplog.text, what="the skip line")
        assert _row(app, "gw9") is None
    finally:
        app.close()


def test_sighup_reads_the_directory_without_waiting_for_the_scan(tmp_path, service):
    app, folder = _dir_server(tmp_path, scan=3600)
    device = start_device(app, service.address, id="gw6", secret=SECRET)
    try:
        _write(folder / "gw6.toml", 'host = "127.0.0.1:0"\nsecret = "%s"\n' % SECRET)
        app.apply_settings(app.settings)   # Service.reload on SIGHUP
        wait_for(lambda: app.device_host_address("gw6"), what="gw6 after the reload")
    finally:
        device.close()
        app.close()


def test_ctl_device_add_writes_a_private_file_the_server_serves(tmp_path, service):
    app, folder = _dir_server(tmp_path)
    config = tmp_path / "server.toml"
    config.write_text('[server]\nlisten = "%s:%d"\ndevices_dir = "%s"\n'
                      % (app.listen_address + (str(folder),)))
    port = free_port()
    command = [sys.executable, "-m", "tcprc", "ctl", "--role", "server", "-c", str(config),
               "device", "add", "gw7", "--host", "127.0.0.1:%d" % port]
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    path = folder / "gw7.toml"
    assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o600
    secret = [line for line in done.stdout.splitlines() if line.startswith("secret: ")][0][8:]
    assert len(secret) >= 43 and "id = \"gw7\"" in done.stdout
    assert "server = \"%s:%d\"" % app.listen_address in done.stdout
    device = start_device(app, service.address, id="gw7", secret=secret)
    try:
        wait_for(lambda: app.device_host_address("gw7") == ("127.0.0.1", port), what="gw7 up")
        _round_trip(("127.0.0.1", port))
    finally:
        device.close()
        app.close()
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 1 and "exists already" in again.stderr


# ---- item 3: per-device limits ------------------------------------------------------------

def test_a_device_over_max_streams_refuses_clients_and_the_others_are_untouched(service, caplog):
    app = _server({"gw1": {"secret": SECRET, "host": "127.0.0.1:0"},
                   "gw2": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()}},
                  max_streams_per_device=2)
    gw1 = start_device(app, service.address, id="gw1", secret=SECRET)
    gw2 = start_device(app, service.address, id="gw2", secret=SECRET)
    held = []
    try:
        wait_for(lambda: app.device_host_address("gw1") and app.device_host_address("gw2"),
                 what="both up")
        for _ in range(2):
            conn = socket.create_connection(app.device_host_address("gw1"), timeout=10)
            conn.sendall(b"held")
            assert recv_exactly(conn, 4) == b"held"
            held.append(conn)
        extra = socket.create_connection(app.device_host_address("gw1"), timeout=10)
        with extra:
            assert extra.recv(10) == b"", "the third client is closed"
        line = wait_for(lambda: [r.getMessage() for r in caplog.records
                                 if "max_streams_per_device" in r.getMessage()],
                        what="the refusal line")
        assert len(line) == 1 and "refused client 127.0.0.1:" in line[0]
        assert _row(app, "gw1")["refused_clients"] == 1 and _row(app, "gw1")["streams"] == 2
        for _ in range(3):   # gw2 has its own limit, untouched by gw1's
            _round_trip(app.device_host_address("gw2"))
        held.pop().close()
        wait_for(lambda: _row(app, "gw1")["streams"] == 1, what="one stream closed")
        _round_trip(app.device_host_address("gw1"))   # room again
    finally:
        for conn in held:
            conn.close()
        gw1.close()
        gw2.close()
        app.close()


def test_idle_connections_from_one_source_cannot_keep_a_device_from_another_out(service):
    """max_pending_per_source: a source holding many unauthenticated uplinks loses its
    own oldest; a device from another address (127.0.0.2) still gets in."""
    app = _server({"gw1": {"secret": SECRET, "host": "127.0.0.1:0"}}, max_pending=8,
                  max_pending_per_source=2, listen_timeout=30)
    idle = []
    device = None
    try:
        for _ in range(20):   # the noisy source: 127.0.0.2
            idle.append(socket.create_connection(app.listen_address, timeout=10,
                                                 source_address=("127.0.0.2", 0)))
        wait_for(lambda: sum(_closed(conn) for conn in idle) == 18,
                 what="all but the noisy source's newest 2 dropped")
        device = DeviceApp(settings("device", server="%s:%d" % app.listen_address,
                                    local="%s:%d" % service.address, id="gw1", secret=SECRET,
                                    reconnect_min=0.05, reconnect_max=0.5))
        device.start()
        wait_for(lambda: app.device_host_address("gw1"), what="gw1 up beside the flood")
        _round_trip(app.device_host_address("gw1"))
    finally:
        for conn in idle:
            conn.close()
        if device is not None:
            device.close()
        app.close()


def _closed(conn):
    conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# ---- item 5: the status page, /api/devices and /metrics -----------------------------------

def _get(app, path):
    import urllib.request
    url = "http://%s:%d%s" % (app.http_address + (path,))
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers["Content-Type"], answer.read().decode()


@pytest.fixture
def http_fleet(service):
    """gw1 up with some traffic, gw2 down with a failed authentication, the page on."""
    devices = {"gw1": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()},
               "gw2": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()}}
    app = _server(devices, http="127.0.0.1:0")
    gw1 = start_device(app, service.address, id="gw1", secret=SECRET)
    bad = start_device(app, service.address, id="gw2", secret=OTHER, reconnect_min=30,
                  reconnect_max=30)
    wait_for(lambda: app.device_host_address("gw1") and _row(app, "gw2")["auth_failures"],
             what="gw1 up, gw2 refused")
    bad.close()
    _round_trip(app.device_host_address("gw1"), b"y" * 500)
    wait_for(lambda: _row(app, "gw1")["bytes_down"] >= 500 and _row(app, "gw1")["rtt"],
             what="gw1's bytes and rtt")
    yield app
    gw1.close()
    app.close()


def test_api_devices_is_the_device_table(http_fleet):
    import json
    status, kind, body = _get(http_fleet, "/api/devices")
    rows = {row["id"]: row for row in json.loads(body)}
    assert status == 200 and kind == "application/json"
    assert rows["gw1"]["state"] == "up" and rows["gw1"]["bytes_down"] >= 500
    assert rows["gw2"]["auth_failures"] == 1 and SECRET not in body and OTHER not in body


def test_metrics_carry_a_device_label(http_fleet):
    status, kind, body = _get(http_fleet, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['tcprc_session_up{device="gw1"}'] == 1
    assert samples['tcprc_session_up{device="gw2"}'] == 0
    assert samples['tcprc_bytes_to_device_total{device="gw1"}'] >= 500
    assert samples['tcprc_sessions_started_total{device="gw1"}'] == 1
    assert samples['tcprc_auth_failures_total{device="gw2"}'] == 1
    assert samples['tcprc_refused_clients_total{device="gw1"}'] == 0
    assert 0 < samples['tcprc_heartbeat_rtt_seconds{device="gw1"}'] < 5
    assert 'tcprc_heartbeat_rtt_seconds{device="gw2"}' not in samples   # no session, no rtt
    assert "# TYPE tcprc_bytes_from_device_total counter" in body


def test_label_values_and_the_page_escape_what_they_show():
    from tcprc.server.http import label, metrics_text
    from tcprc.server.page import PAGE
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    text = metrics_text([{"id": 'x"y', "state": "up", "streams": 0, "bytes_up": 0,
                          "bytes_down": 0, "sessions": 1, "auth_failures": 0,
                          "refused_clients": 0, "rtt": None}], 0)
    assert 'tcprc_session_up{device="x\\"y"} 1' in text
    assert "innerHTML" not in PAGE and "textContent" in PAGE   # rows never parsed as HTML
    assert "http://" not in PAGE and "https://" not in PAGE      # no outside assets


def test_an_unknown_path_is_404(http_fleet):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(http_fleet, "/etc/passwd")
    assert caught.value.code == 404


def _chromium():
    import shutil
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (apt-get install chromium): the browser test "
                "of the status page cannot run")


def _browser(url, tmp_path, *extra):
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--no-first-run", "--user-data-dir=%s" % tmp_path,
               "--virtual-time-budget=5000"] + list(extra) + [url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_real_browser_renders_the_table_from_the_api(http_fleet, tmp_path):
    import html.parser

    class Rows(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell, self.summary = [], None, ""
            self._in_summary = False

        def handle_starttag(self, tag, attrs):
            if tag == "tr" and dict(attrs).get("data-device"):
                self.rows.append([])
            elif tag == "td" and self.rows:
                self.cell = ""
            self._in_summary = dict(attrs).get("id") == "summary"

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data
            if self._in_summary:
                self.summary += data

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                self.rows[-1].append(self.cell)
                self.cell = None
            self._in_summary = False

    url = "http://%s:%d/" % http_fleet.http_address
    done = _browser(url, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = Rows()
    parsed.feed(done.stdout)
    by_id = {row[0]: row for row in parsed.rows}
    assert set(by_id) == {"gw1", "gw2"}, done.stdout[-3000:]   # only the script makes rows
    assert by_id["gw1"][1] == "up" and by_id["gw2"][1] == "down"
    host = "%s:%d" % http_fleet.device_host_address("gw1")
    assert by_id["gw1"][2] == host and by_id["gw1"][3] == "v2, no TLS"   # where to reach it
    assert by_id["gw2"][11] == "1" and "authentication failed" in by_id["gw2"][12]
    assert by_id["gw1"][12] == ""   # healthy: no error, no red dash
    assert parsed.summary.startswith("2 device(s), 1 up, 1 down (1 with an error); updated")
