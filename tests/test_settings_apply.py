"""When a changed setting applies, said honestly: `config set` answers what became of
the value, SIGHUP logs what was applied and what waits for a restart, and the
running agents do what the schema's `applies` flags say (real apps, real sockets,
real processes)."""

import os
import signal
import urllib.request

import pytest

from support.net import free_port, port_accepts
from support.peers import legacy_device
from support.waiting import wait_for
from tcprc.device.app import DeviceApp
from tcprc.keys import LIVE, NEW, RESTART, SESSION
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import SCHEMA, build_config, check_value
from tcprc.server.app import ServerApp

APPLIED = {
    LIVE: "applied at once",
    NEW: "applied to new uplinks; live sessions keep the old value until they redial",
}


def _another(role, section, key):
    """A valid value of a simple key other than its default (schema order kept, so
    heartbeat_interval still stays below heartbeat_timeout)."""
    spec = SCHEMA[role][section][key]
    current = build_config(role, {}, "t").sections[section]
    value = getattr(current, key)
    if spec.type is bool:
        return not value
    assert spec.type in (int, float), "no test value for %s.%s: add one" % (section, key)
    for candidate in (value * 2, value // 2 if spec.type is int else value / 2):
        try:
            return check_value(role, section, key, spec.type(candidate))
        except ValueError:
            continue
    raise AssertionError("no test value for %s.%s" % (section, key))


def _simple(role, applies):
    return [key for key, spec in SCHEMA[role][role].items()
            if spec.applies in applies and spec.type in (bool, int, float)]


# -- the device ------------------------------------------------------------------------

def test_the_device_keeps_its_tunnel_for_keys_that_do_not_restart_it(legacy_server):
    cfg = build_config("device", {"device": {"server": legacy_server.address,
                                             "local": "127.0.0.1:9"}}, "test")
    app = DeviceApp(cfg.device)
    app.start()
    try:
        parser = CommandParser(app, cfg)
        peer = legacy_server.accept()
        peer.read_frame()   # its LISTEN
        keys = _simple("device", (LIVE, RESTART))
        assert {"reconnect_max", "autostart"} <= set(keys)
        for key in keys:
            value = _another("device", "device", key)
            answer = parser.execute("config set device.%s %s" % (key, str(value).lower()))
            spec = SCHEMA["device"]["device"][key]
            if spec.applies == RESTART:
                assert answer[0].endswith(": needs a restart; the running device keeps %s"
                                          % str(spec.default).lower()), answer
            else:
                assert answer[0].endswith(": " + APPLIED[LIVE]), answer
            assert getattr(app.settings, key) == value
        assert peer.nothing_for(0.5)   # the same uplink: not closed, no new LISTEN
        assert parser.execute("config set device.keepalive_idle 99") == [
            "device.keepalive_idle = 99: applied: a running tunnel redials with it", "OK"]
        peer.sock.settimeout(10)
        assert peer.sock.recv(1) == b""   # closed, and dialled again
        legacy_server.accept().read_frame()
    finally:
        app.close()


# -- the server ------------------------------------------------------------------------

@pytest.fixture
def running_server():
    listen = "127.0.0.1:%d" % free_port()
    cfg = build_config("server", {"server": {"listen": listen, "host": "127.0.0.1:0"}}, "test")
    app = ServerApp(cfg.server)
    app.start()
    yield app, CommandParser(app, cfg), listen
    app.close()


def test_config_set_of_listen_says_it_needs_a_restart_and_the_server_stays(running_server):
    app, parser, listen = running_server
    before = app.listen_address
    elsewhere = "127.0.0.1:%d" % free_port()
    assert parser.execute("config set server.listen %s" % elsewhere) == [
        'server.listen = "%s": needs a restart; the running server keeps "%s"'
        % (elsewhere, listen), "OK"]
    assert app.listen_address == before and port_accepts(before)
    assert not port_accepts(("127.0.0.1", int(elsewhere.rpartition(":")[2])))
    peer = legacy_device(app)   # devices still dial where it listens
    assert parser.execute("config get server.listen") == [
        'server.listen = "%s"' % elsewhere, "OK"]   # what config save would write
    assert parser.execute("config set server.listen %s" % listen) == [
        'server.listen = "%s": as the running server has it; nothing waits for a restart'
        % listen, "OK"]
    peer.close()


def test_the_server_keeps_a_session_for_keys_that_apply_at_once_or_to_new_uplinks(
        running_server):
    app, parser, _ = running_server
    peer = legacy_device(app)
    keys = _simple("server", (LIVE, NEW))
    assert {"takeover", "legacy", "keepalive_idle", "max_streams_per_device"} <= set(keys)
    for key in keys:
        value = _another("server", "server", key)
        answer = parser.execute("config set server.%s %s" % (key, str(value).lower()))
        assert answer[0].endswith(": " + APPLIED[SCHEMA["server"]["server"][key].applies]), answer
        assert getattr(app.settings, key) == value
    assert app.settings.legacy is False   # legacy devices refused from now on ...
    assert peer.nothing_for(0.5) and app.link_on() is not None   # ... the one up stays
    assert parser.execute("config set server.allow_from 127.0.0.0/8") == [
        'server.allow_from = ["127.0.0.0/8"]: applied at once', "OK"]
    assert peer.nothing_for(0.2)
    assert parser.execute("config set server.host 127.0.0.1:%d" % free_port())[0].endswith(
        ": applied: the sessions it affects restart (their devices redial)")
    peer.sock.settimeout(10)
    assert peer.sock.recv(1) == b""   # the session on [server] host ended


# -- SIGHUP on real processes --------------------------------------------------------------

def _lines(agents, proc, text):
    return [line for line in agents.log(proc).splitlines() if text in line]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP")
def test_sighup_logs_what_was_applied_and_what_waits_for_a_restart(agents, tmp_path):
    listen, moved, http = free_port(), free_port(), free_port()
    proc = agents.start("server", config='[server]\nlisten = "127.0.0.1:%d"\n'
                                         'host = "127.0.0.1:0"\n' % listen)
    wait_for(lambda: "server agent running" in agents.log(proc), timeout=30, what="server up")
    path = tmp_path / "server-0.toml"
    first = path.read_text()
    os.kill(proc.pid, signal.SIGHUP)   # nothing changed
    wait_for(lambda: _lines(agents, proc, "reloaded %s: no change to apply" % path),
             what="the reload line")
    path.write_text(first.replace(str(listen), str(moved)).replace(
        "server-0.sock", "moved.sock") + 'http = "127.0.0.1:%d"\nallow_from = ["127.0.0.0/8"]\n'
        % http)
    os.kill(proc.pid, signal.SIGHUP)
    applied = wait_for(lambda: _lines(agents, proc, "reloaded %s: applied" % path),
                       what="the reload line")
    assert applied[0].endswith("reloaded %s: applied at once: server.allow_from, server.http"
                               % path), applied
    waiting = _lines(agents, proc, "reload: needs a restart")
    assert len(waiting) == 1 and " WARNING " in waiting[0], waiting
    assert waiting[0].endswith(
        'reload: needs a restart to apply: server.listen = "127.0.0.1:%d" (running '
        '"127.0.0.1:%d"), control.socket = "%s" (running "%s")'
        % (moved, listen, tmp_path / "moved.sock", tmp_path / "server-0.sock")), waiting
    with urllib.request.urlopen("http://127.0.0.1:%d/api/devices" % http, timeout=10) as page:
        assert page.status == 200   # the page was applied: it answers
    assert port_accepts(("127.0.0.1", listen)) and not port_accepts(("127.0.0.1", moved))
    assert proc.poll() is None


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP")
def test_sighup_on_the_device_names_the_keys_by_how_they_apply(agents, tmp_path):
    proc = agents.start("device", config='[device]\nlocal = "127.0.0.1:22"\n')
    wait_for(lambda: "device agent running" in agents.log(proc), timeout=30, what="device up")
    path = tmp_path / "device-0.toml"
    path.write_text(path.read_text().replace("127.0.0.1:22", "127.0.0.1:2222")
                    + "reconnect_max = 5.0\nautostart = false\n[log]\nlevel = \"debug\"\n")
    os.kill(proc.pid, signal.SIGHUP)
    applied = wait_for(lambda: _lines(agents, proc, "reloaded %s" % path), what="the reload line")
    assert applied[0].endswith(
        "reloaded %s: applied at once: device.reconnect_max, log.level; applied by restarting "
        "the tunnel: device.local" % path), applied
    waiting = _lines(agents, proc, "reload: needs a restart")
    assert waiting[0].endswith("reload: needs a restart to apply: device.autostart = false "
                               "(running true)"), waiting


def test_config_set_of_the_log_applies_it_at_once(agents, tmp_path):
    from tcprc.ops.ctl import send_command
    proc = agents.start("device")
    wait_for(lambda: os.path.exists(proc.control_socket), timeout=30, what="control socket")
    target = tmp_path / "moved.log"
    assert send_command(proc.control_socket, "config set log.target %s" % target, 10) == [
        'log.target = "%s": applied at once' % target, "OK"]
    assert 'config set log.target = "%s": applied at once' % target in target.read_text()
    answer = send_command(proc.control_socket, "config set log.target /nonexistent/dir/x.log", 10)
    assert len(answer) == 1 and answer[0].startswith("ERROR log.target: could not apply:"), answer
    assert send_command(proc.control_socket, "config get log.target", 10) == [
        'log.target = "%s"' % target, "OK"]
