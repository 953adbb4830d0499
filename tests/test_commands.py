"""CommandParser against a real DeviceApp (and a real listening socket where a
tunnel must come up). Every answer ends in OK or is one ERROR line."""

import os
import socket
import sys

import pytest

from support.net import free_port
from support.waiting import wait_for
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config, load_config
from tcprc.device.app import DeviceApp

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@pytest.fixture
def agent():
    """Build (cfg, app, parser) for a raw config dict; everything closed after."""
    made = []

    def make(raw=None, path=None):
        cfg = build_config("device", raw or {}, "test", path)
        app = DeviceApp(cfg.device)
        app.start()
        made.append(app)
        return cfg, app, CommandParser(app, cfg)
    yield make
    for app in made:
        app.close()


def assert_error(lines, *words):
    assert len(lines) == 1 and lines[0].startswith("ERROR "), lines
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines)


def status_of(parser):
    lines = parser.execute("status")
    assert lines[-1] == "OK"
    return dict(line.split(": ", 1) for line in lines[:-1])


# -- language ---------------------------------------------------------------

def test_help_lists_every_command_and_explains_one(agent):
    _, _, parser = agent()
    lines = parser.execute("help")
    assert lines[-1] == "OK"
    text = "\n".join(lines)
    for name in ("TCPRemoteConnect", "TCPRemoteDisconnect", "status", "config get", "help"):
        assert name in text
    detail = parser.execute("HELP tcpremoteconnect")
    assert detail[-1] == "OK" and detail[0].startswith("TCPRemoteConnect [ServerAddress")
    assert_error(parser.execute("help nosuch"), "unknown command")
    assert_error(parser.execute("help a b"), "at most one")


def test_unknown_blank_and_unparsable_lines(agent):
    _, _, parser = agent()
    assert_error(parser.execute("frobnicate now"), "unknown command", "frobnicate")
    assert parser.execute("") == [] and parser.execute("   \t ") == []
    assert_error(parser.execute('status "unterminated'), "cannot parse")


def test_names_are_case_insensitive(agent):
    _, _, parser = agent()
    for line in ("STATUS", "Status", "tcpremotedisconnect", "TCPREMOTEDISCONNECT", "Help"):
        assert parser.execute(line)[-1] == "OK", line


def test_status_of_an_idle_device(agent):
    _, _, parser = agent()
    status = status_of(parser)
    assert status["state"] == "idle"
    assert status["server"] == "-" and status["local"] == "127.0.0.1:23"
    assert status["clients"] == "0" and status["bytes_up"] == "0" and status["bytes_down"] == "0"
    assert status["uptime"] == "-" and status["last_error"] == "-"
    assert_error(parser.execute("status now"), "no parameters")


def test_parser_never_raises_into_its_channel():
    cfg = build_config("device", {}, "test")
    parser = CommandParser(None, cfg)     # no app at all: every app call fails
    assert_error(parser.execute("status"), "internal error")
    assert_error(parser.execute("TCPRemoteConnect 127.0.0.1 9 127.0.0.1 22"), "internal error")


# -- TCPRemoteConnect / TCPRemoteDisconnect -----------------------------------

@pytest.mark.parametrize("line, words", [
    ("TCPRemoteConnect somewhere", ["0, 2 or 4", "got 1"]),
    ("TCPRemoteConnect 127.0.0.1 9000 127.0.0.1", ["0, 2 or 4", "got 3"]),
    ("TCPRemoteConnect 127.0.0.1 9000 127.0.0.1 22 extra", ["got 5"]),
    ("TCPRemoteConnect 127.0.0.1 0 127.0.0.1 22", ["ServerPort", "out of range"]),
    ("TCPRemoteConnect 127.0.0.1 65536 127.0.0.1 22", ["ServerPort", "out of range"]),
    ("TCPRemoteConnect 127.0.0.1 http 127.0.0.1 22", ["ServerPort", "not a number"]),
    ("TCPRemoteConnect 127.0.0.1 -1 127.0.0.1 22", ["ServerPort", "not a number"]),
    ("TCPRemoteConnect 127.0.0.1 9000 127.0.0.1 99999", ["LocalPort", "out of range"]),
    ("TCPRemoteConnect 300.1.1.1 9000 127.0.0.1 22", ["ServerAddress", "300.1.1.1"]),
    ("TCPRemoteConnect 'my host' 9000 127.0.0.1 22", ["ServerAddress", "my host"]),
    ('TCPRemoteConnect "" 9000 127.0.0.1 22', ["ServerAddress is empty"]),
    ("TCPRemoteConnect 127.0.0.1 9000 bad_name! 22", ["LocalAddress"]),
    ("TCPRemoteDisconnect now", ["no parameters"]),
])
def test_bad_tunnel_parameters_are_refused_and_change_nothing(agent, line, words):
    _, _, parser = agent()
    assert_error(parser.execute(line), *words)
    assert status_of(parser)["state"] == "idle"


def test_connect_without_any_server_known(agent):
    _, _, parser = agent()
    assert_error(parser.execute("TCPRemoteConnect"), "no server")
    assert_error(parser.execute('TCPRemoteConnect ""'), "no server")


@pytest.mark.parametrize("line", ["TCPRemoteConnect", 'TCPRemoteConnect ""', "tcpremoteconnect ''"])
def test_connect_with_stored_settings(agent, line):
    port = free_port()
    _, _, parser = agent({"device": {"server": "127.0.0.1:%d" % port, "autostart": False,
                                     "local": "127.0.0.1:2323"}})
    assert status_of(parser)["state"] == "idle"
    assert parser.execute(line) == ["OK"]
    status = status_of(parser)
    assert status["server"] == "127.0.0.1:%d" % port and status["local"] == "127.0.0.1:2323"
    # Nothing listens there: the device retries, and says why.
    wait_for(lambda: "refused" in status_of(parser)["last_error"].lower(), what="connect error")
    assert parser.execute("TCPRemoteDisconnect") == ["OK"]
    wait_for(lambda: status_of(parser)["state"] == "idle", what="idle")
    assert status_of(parser)["server"] == "-"


def test_connect_with_parameters_brings_the_uplink_up(agent):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)
    port = listener.getsockname()[1]
    _, _, parser = agent()
    try:
        assert parser.execute("TCPRemoteConnect localhost %d '' 2222" % port) == ["OK"]
        conn, _ = listener.accept()
        conn.settimeout(5)
        assert conn.recv(4) == b"\x00\x00\x04\x00"     # LISTEN, on the wire
        status = wait_for(lambda: (lambda s: s if s["state"] == "up" else None)(status_of(parser)),
                      what="uplink up")
        assert status["server"] == "localhost:%d" % port
        assert status["local"] == "127.0.0.1:2222"     # empty LocalAddress: this device
        assert parser.execute("TCPRemoteDisconnect") == ["OK"]
        assert conn.recv(1) == b""                      # the uplink is closed
        conn.close()
        wait_for(lambda: status_of(parser)["state"] == "idle", what="idle")
    finally:
        listener.close()


def test_two_parameters_keep_the_configured_local(agent):
    port = free_port()
    _, _, parser = agent({"device": {"local": "127.0.0.1:8080"}})
    assert parser.execute("TCPRemoteConnect 127.0.0.1 %d" % port) == ["OK"]
    status = status_of(parser)
    assert status["server"] == "127.0.0.1:%d" % port and status["local"] == "127.0.0.1:8080"


# -- config get / set / save --------------------------------------------------

def test_config_get(agent):
    _, _, parser = agent({"device": {"server": "10.0.0.1:9000"}})
    assert parser.execute("config get device.server") == ['device.server = "10.0.0.1:9000"', "OK"]
    assert parser.execute("CONFIG GET device.autostart") == ["device.autostart = true", "OK"]
    assert parser.execute("config get device.allow") == ["device.allow = []", "OK"]
    lines = parser.execute("config get console")
    assert lines[-1] == "OK" and 'console.prompt = "tcprc> "' in lines
    assert_error(parser.execute("config get device.nosuch"), "unknown key", "device.nosuch")
    assert_error(parser.execute("config get nosuch.key"), "unknown section")
    assert parser.execute("config get device.lcoal") == [
        "ERROR unknown key 'device.lcoal' (did you mean device.local?)"]
    assert parser.execute("config get devcie.local") == [
        "ERROR unknown section 'devcie' (did you mean device?)"]
    assert_error(parser.execute("config get"), "usage")
    assert_error(parser.execute("config frob"), "unknown config action")
    assert_error(parser.execute("config"), "get, set or save")


@pytest.mark.parametrize("line, expect", [
    ("config set device.local 127.0.0.1:2222", 'device.local = "127.0.0.1:2222"'),
    ("config set device.autostart off", "device.autostart = false"),
    ("config set device.autostart YES", "device.autostart = true"),
    ("config set device.keepalive_idle 120", "device.keepalive_idle = 120"),
    ("config set device.connect_timeout 2.5", "device.connect_timeout = 2.5"),
    ("config set device.connect_timeout 3", "device.connect_timeout = 3.0"),
    ("config set device.allow 10.0.0.1:80 10.0.0.2:22", 'device.allow = ["10.0.0.1:80", "10.0.0.2:22"]'),
    ("config set device.allow 10.0.0.1:80,[::1]:22", 'device.allow = ["10.0.0.1:80", "[::1]:22"]'),
    ('config set device.allow ""', "device.allow = []"),
    ("config set console.prompt 'gw1> '", 'console.prompt = "gw1> "'),
])
def test_config_set_converts_and_validates(agent, line, expect):
    _, _, parser = agent()
    assert parser.execute(line)[-1] == "OK"
    key = line.split()[2]
    assert parser.execute("config get " + key) == [expect, "OK"]


@pytest.mark.parametrize("line, words", [
    ("config set device.local nowhere", ["device.local", "no port"]),
    ("config set device.local 127.0.0.1:0", ["out of range"]),
    ("config set device.autostart maybe", ["true or false"]),
    ("config set device.keepalive_idle 1.5", ["an integer"]),
    ("config set device.keepalive_idle 0", ["between"]),
    ("config set device.connect_timeout fast", ["a number"]),
    ("config set device.connect_timeout nan", ["between"]),
    ("config set device.allow 10.0.0.1", ["no port"]),
    ("config set device.server a b", ["device.server", "entry 1", "'a' (no port)"]),
    ("config set device.server 10.0.0.1:9 10.0.0.1:9", ["entry 2", "listed twice"]),
    ("config set device.server", ["usage"]),
    ("config set device.nosuch 1", ["unknown key"]),
    ("config set log.level loud", ["one of"]),
])
def test_config_set_refuses_bad_values_and_keeps_the_old(agent, line, words):
    _, app, parser = agent()
    before = parser.execute("config get device")
    assert_error(parser.execute(line), *words)
    assert parser.execute("config get device") == before


def test_config_set_device_key_is_applied_to_the_running_app(agent):
    port = free_port()
    _, app, parser = agent()
    assert parser.execute("config set device.server 127.0.0.1:%d" % port) == [
        'device.server = "127.0.0.1:%d": applied: a running tunnel redials with it' % port, "OK"]
    assert app.settings.server == ("127.0.0.1:%d" % port,)
    # autostart is on: the new server is dialled at once.
    assert status_of(parser)["server"] == "127.0.0.1:%d" % port
    lines = parser.execute("config set console.baudrate 9600")
    assert lines == ["console.baudrate = 9600: needs a restart; the running device keeps 115200",
                     "OK"]


def test_config_save_without_a_file(agent):
    _, _, parser = agent()
    parser.execute("config set device.local 127.0.0.1:22")
    assert_error(parser.execute("config save"), "without -c")


ORIGINAL = """\
# gateway 17
[device]
server = "10.1.2.3:9000"  # back office
reconnect_max = 30.0

[log]
level = "warning"
"""


def test_config_save_writes_set_values_and_keeps_the_rest(agent, tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(ORIGINAL)
    cfg = load_config(str(path), "device")
    _, _, parser = agent(cfg.raw, cfg.path)
    assert parser.execute("config set device.autostart false")[-1] == "OK"
    assert parser.execute("config set device.local '127.0.0.1:2222'")[-1] == "OK"
    assert parser.execute("config set console.prompt 'say \"hi\"\\> '")[-1] == "OK"
    lines = parser.execute("config save")
    assert lines[-1] == "OK" and "3 changed" in lines[0]
    text = path.read_text()
    assert "# gateway 17" in text and "# back office" in text
    doc = tomllib.loads(text)
    assert doc == {
        "device": {"server": "10.1.2.3:9000", "reconnect_max": 30.0, "autostart": False,
                   "local": "127.0.0.1:2222"},
        "log": {"level": "warning"},
        "console": {"prompt": 'say "hi"\\> '},
    }
    again = load_config(str(path), "device")
    assert again.device.local == "127.0.0.1:2222" and again.console.prompt == 'say "hi"\\> '
    assert sorted(os.listdir(tmp_path)) == ["device.toml"]   # no temp file left


def test_config_save_keeps_edits_made_on_disk_since_the_start(agent, tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(ORIGINAL)
    cfg = load_config(str(path), "device")
    _, _, parser = agent(cfg.raw, cfg.path)
    path.write_text(ORIGINAL + '\n[control]\nsocket = "/tmp/x.sock"\n')
    parser.execute("config set device.keepalive_idle 99")
    assert parser.execute("config save")[-1] == "OK"
    doc = tomllib.loads(path.read_text())
    assert doc["control"] == {"socket": "/tmp/x.sock"} and doc["device"]["keepalive_idle"] == 99


def test_config_save_refuses_to_overwrite_a_broken_file(agent, tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(ORIGINAL)
    cfg = load_config(str(path), "device")
    _, _, parser = agent(cfg.raw, cfg.path)
    path.write_text("[device\nbroken")
    parser.execute("config set device.keepalive_idle 99")
    assert_error(parser.execute("config save"), "not valid TOML", "not overwritten")
    assert path.read_text() == "[device\nbroken"


def test_config_save_recreates_a_deleted_file(agent, tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(ORIGINAL)
    cfg = load_config(str(path), "device")
    _, _, parser = agent(cfg.raw, cfg.path)
    path.unlink()
    parser.execute("config set device.keepalive_idle 99")
    assert parser.execute("config save")[-1] == "OK"
    again = load_config(str(path), "device")
    assert again.device.server == ("10.1.2.3:9000",) and again.device.keepalive_idle == 99


def test_help_fits_an_80_column_terminal(agent):
    _, _, parser = agent()
    for topic in ("", "tcpremoteconnect", "tcpremotedisconnect", "status", "config", "help"):
        for line in parser.execute("help " + topic):
            assert len(line) <= 80, line


@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (0, "0s"), (59.9, "59s"), (3723.2, "3723s (1:02:03)"), (90061, "90061s (1d 1:01:01)"),
])
def test_uptime_reads_well(seconds, text):
    from tcprc.ops.commands import _format_status_value
    assert _format_status_value("uptime", seconds) == text
