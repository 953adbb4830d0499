"""Protocol v2 and TLS configuration: keys, checks across keys, secrets kept
out of messages, logs and `config get`, [server.devices.ID] tables, flags."""

import copy
import logging
import pickle

import pytest

from support.agents import run_tcprc
from tcprc.cli import build_parser, load_role_config
from tcprc.device.app import DeviceApp
from tcprc.ops.commands import CommandParser, _format_status_value, masked
from tcprc.ops.config import ConfigError, build_config, load_config
from tcprc.ops.control import ControlServer
from tcprc.ops.ctl import send_command
from tcprc.server.app import ServerApp
from tcprc.settings import Secret

HEX = "0123456789abcdef" * 2            # 32 hex digits: exactly 128 bits
WORDS = "correct-horse-battery-x"       # 23 characters, not all hex
SHORT = "s3cr3t-but-far-too-sh"         # 21 characters: too short, must never be printed
FP = "ab" * 32


def load(tmp_path, role, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(str(path), role), str(path)


def error_of(tmp_path, role, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), role)
    message = str(info.value)
    assert "\n" not in message
    prefix = str(path) + ": "
    assert message.startswith(prefix), message
    return message[len(prefix):]


def write(path, text):
    path.write_text(text)
    return str(path)


# -- keys and defaults --------------------------------------------------------

def test_defaults(tmp_path):
    device = build_config("device", {}, "t").device
    assert (device.window, device.heartbeat_interval, device.heartbeat_timeout) == (262144, 15.0, 45.0)
    assert (device.protocol, device.id, device.secret, device.secret_file, device.tls) == (
        "auto", "", None, "", False)
    server = build_config("server", {}, "t").server
    assert server.legacy is True and dict(server.devices) == {}
    assert (server.tls_cert, server.tls_key, server.tls_client_ca) == ("", "", "")
    assert server.window == 262144 and server.heartbeat_timeout == 45.0


def test_device_identity_and_tls_keys(tmp_path):
    ca = write(tmp_path / "ca.pem", "ca")
    cert = write(tmp_path / "cert.pem", "cert")
    key = write(tmp_path / "key.pem", "key")
    cfg, _ = load(tmp_path, "device", """[device]
protocol = "v2"
id = "gw-1.site_A"
secret = "%s"
tls = true
tls_cert = "%s"
tls_key = "%s"
tls_server_name = "tunnel.example.net"
tls_fingerprint = "SHA256:%s"
window = 16384
heartbeat_interval = 1
heartbeat_timeout = 2
""" % (WORDS, cert, key, ":".join(["AB"] * 32)))
    d = cfg.device
    assert d.id == "gw-1.site_A" and d.protocol == "v2" and d.tls is True
    assert isinstance(d.secret, Secret) and d.secret.reveal() == WORDS.encode()
    assert (d.tls_ca, d.tls_cert, d.tls_key) == ("", cert, key)
    assert d.tls_fingerprint == "sha256:" + FP       # normalised: lower case, no colons
    assert load(tmp_path, "device", '[device]\ntls = true\ntls_ca = "%s"\n' % ca,
                "ca.toml")[0].device.tls_ca == ca
    assert (d.window, d.heartbeat_interval, d.heartbeat_timeout) == (16384, 1.0, 2.0)


def test_secret_file_is_read_and_stripped(tmp_path):
    secret = write(tmp_path / "s", "\n  %s \r\n" % HEX)
    cfg, _ = load(tmp_path, "device", '[device]\nid = "gw1"\nsecret_file = "%s"\n' % secret)
    assert cfg.device.secret.reveal() == HEX.encode() and cfg.device.secret_file == secret


def test_server_devices_tables_and_legacy(tmp_path):
    secret = write(tmp_path / "s", HEX + "\n")
    text = """[server]
host = "127.0.0.1:2222"
[server.devices.gw1]
host = "127.0.0.1:2301"
secret = "%s"
[server.devices."gw.2"]
host = ":2302"
secret_file = "%s"
""" % (WORDS, secret)
    cfg, _ = load(tmp_path, "server", text)
    devices = cfg.server.devices
    assert sorted(devices) == ["gw.2", "gw1"]
    assert devices["gw1"].host == "127.0.0.1:2301" and devices["gw1"].id == "gw1"
    assert devices["gw1"].secret.reveal() == WORDS.encode()
    assert devices["gw.2"].secret.reveal() == HEX.encode()
    assert cfg.server.legacy is False                # absent, devices configured
    with pytest.raises(TypeError):
        devices["gw3"] = devices["gw1"]              # settings are read-only
    cfg, _ = load(tmp_path, "server", text.replace("[server]\n", "[server]\nlegacy = true\n"))
    assert cfg.server.legacy is True                 # present: as given
    cfg, _ = load(tmp_path, "server", "[server]\nlegacy = false\n")
    assert cfg.server.legacy is False and not cfg.server.devices


# -- one line per error ---------------------------------------------------------

@pytest.mark.parametrize("role, text, expected", [
    ("device", "[device]\nheartbeat_interval = 20\nheartbeat_timeout = 20\n",
     "[device] heartbeat_timeout (20.0) must exceed heartbeat_interval (20.0)"),
    ("server", "[server]\nheartbeat_timeout = 10\n",
     "[server] heartbeat_timeout (10.0) must exceed heartbeat_interval (15.0)"),
    ("device", "[device]\nwindow = 1000\n", "[device] window must be between 16384 and 16777216, got 1000"),
    ("device", "[device]\nprotocol = \"v3\"\n", "[device] protocol must be one of auto, legacy, v2, got 'v3'"),
    ("device", "[device]\nid = \"gw 1\"\nsecret = \"%s\"\n" % HEX,
     "[device] id must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got 'gw 1'"),
    ("device", "[device]\nid = \"%s\"\nsecret = \"%s\"\n" % ("x" * 65, HEX),
     "[device] id must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got '%s'" % ("x" * 65)),
    ("device", "[device]\nid = \"gw1\"\n", "[device] id 'gw1' needs secret or secret_file"),
    ("device", "[device]\nsecret = \"%s\"\n" % HEX,
     "[device] a secret needs an id: set id as well (the server's [server.devices.ID] table)"),
    ("device", "[device]\nid = \"gw1\"\nsecret = \"%s\"\nsecret_file = \"/x\"\n" % HEX,
     "[device] secret and secret_file are exclusive: set one of them"),
    ("device", "[device]\nid = \"gw1\"\nsecret = \"%s\"\n" % HEX[:31],
     "[device] secret is shorter than 128 bits: use at least 32 hex digits or 22 other "
     "characters (e.g. openssl rand -hex 16)"),
    ("device", "[device]\nid = \"gw1\"\nsecret = \"%s\"\n" % SHORT,
     "[device] secret is shorter than 128 bits: use at least 32 hex digits or 22 other "
     "characters (e.g. openssl rand -hex 16)"),
    ("device", "[device]\nsecret = 12345678901234567890\n", "[device] secret must be a string"),
    ("device", "[device]\nprotocol = \"legacy\"\nid = \"gw1\"\nsecret = \"%s\"\n" % HEX,
     "[device] protocol = \"legacy\" contradicts id: the legacy protocol has no identity and no TLS"),
    ("device", "[device]\nprotocol = \"legacy\"\ntls = true\n",
     "[device] protocol = \"legacy\" contradicts tls: the legacy protocol has no identity and no TLS"),
    ("device", "[device]\ntls_fingerprint = \"sha256:%s\"\n" % FP,
     "[device] tls_fingerprint is set but tls is false: set tls = true"),
    ("device", "[device]\ntls = true\ntls_fingerprint = \"sha1:%s\"\n" % FP[:40],
     "[device] tls_fingerprint must be \"sha256:\" and 64 hex digits (colons between pairs "
     "allowed), got 'sha1:%s'" % FP[:40]),
    ("device", "[device]\ntls = true\ntls_fingerprint = \"sha256:%s\"\n" % FP[:62],
     "[device] tls_fingerprint must be \"sha256:\" and 64 hex digits (colons between pairs "
     "allowed), got 'sha256:%s'" % FP[:62]),
    ("device", "[device]\ntls = true\ntls_fingerprint = \"sha256:a:%s\"\n" % FP[1:],
     "[device] tls_fingerprint must be \"sha256:\" and 64 hex digits (colons between pairs "
     "allowed), got 'sha256:a:%s'" % FP[1:]),
    ("device", "[device]\ntls = true\ntls_server_name = \"a b\"\n",
     "[device] tls_server_name must be ASCII without spaces, at most 255 characters, got 'a b'"),
    ("device", "[device]\ntls = true\ntls_cert = \"{cert}\"\n",
     "[device] tls_cert is set but tls_key is not: they go together"),
    ("device", "[device]\ntls = true\ntls_key = \"{cert}\"\n",
     "[device] tls_key is set but tls_cert is not: they go together"),
    ("device", "[device]\ntls = true\ntls_ca = \"{missing}\"\n", "[device] tls_ca {missing}: no such file"),
    ("device", "[device]\ntls = true\ntls_cert = \"{cert}\"\ntls_key = \"{dir}\"\n",
     "[device] tls_key {dir}: is a directory, not a regular file"),
    ("server", "[server]\ntls_cert = \"{cert}\"\n", "[server] tls_cert is set but tls_key is not: they go together"),
    ("server", "[server]\ntls_cert = \"{cert}\"\ntls_key = \"{missing}\"\n",
     "[server] tls_key {missing}: no such file"),
    ("server", "[server]\ntls_client_ca = \"{cert}\"\n",
     "[server] tls_client_ca needs tls_cert and tls_key (TLS on the uplink listener)"),
    ("server", "[server]\ntls_cert = \"{cert}\"\ntls_key = \"{cert}\"\ntls_client_ca = \"{missing}\"\n",
     "[server] tls_client_ca {missing}: no such file"),
])
def test_error_lines(tmp_path, role, text, expected):
    names = {"cert": write(tmp_path / "cert.pem", "x"), "missing": str(tmp_path / "nope.pem"),
             "dir": str(tmp_path)}
    text, expected = text.format(**names), expected.format(**names)
    message = error_of(tmp_path, role, text)
    assert message == expected
    for secret in (HEX[:31], SHORT, "12345678901234567890"):
        assert secret not in message


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "is empty"),
    (" \n\t\n", "is empty"),
    (SHORT + "\n", "the secret in it is shorter than 128 bits: use at least 32 hex digits or "
                   "22 other characters (e.g. openssl rand -hex 16)"),
    (b"\xff\xfe" + b"x" * 40, "not UTF-8 text"),
    ("x" * 5000, "longer than 4096 bytes"),
])
def test_secret_file_errors(tmp_path, content, expected):
    path = tmp_path / "secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    message = error_of(tmp_path, "device", '[device]\nid = "gw1"\nsecret_file = "%s"\n' % path)
    assert message == "[device] secret_file %s: %s" % (path, expected)
    assert SHORT not in message


def test_secret_file_that_is_a_directory(tmp_path):
    message = error_of(tmp_path, "device", '[device]\nid = "gw1"\nsecret_file = "%s"\n' % tmp_path)
    assert message == "[device] secret_file %s: is a directory, not a regular file" % tmp_path


@pytest.mark.parametrize("tables, expected", [
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\nservices = "x"\n' % HEX,
     "[server.devices.gw1] services must be tables [server.devices.gw1.services.NAME]"),
    ('[server.devices.gw.1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw] unknown key '1' (known: host, secret, secret_file, previous_secret, "
     "previous_secret_file, services); an id with a dot is quoted: [server.devices.\"gw.1\"]"),
    ('[server.devices.gw1]\nhots = "127.0.0.1:2301"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] unknown key 'hots' (did you mean host?)"),
    ('[server.devices.gw1]\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host is required: the ADDR:PORT where this device's clients connect"),
    ('[server.devices.gw1]\nhost = "nonsense"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host expected ADDR:PORT, got 'nonsense' (no port)"),
    ('[server.devices.gw1]\nhost = 2301\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host must be a string, got 2301"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = 1234567890123456789\n',
     "[server.devices.gw1] secret must be a string"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\n',
     "[server.devices.gw1] needs secret or secret_file"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n' % SHORT,
     "[server.devices.gw1] secret is shorter than 128 bits: use at least 32 hex digits or 22 "
     "other characters (e.g. openssl rand -hex 16)"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\nsecret_file = "/x"\n' % HEX,
     "[server.devices.gw1] secret and secret_file are exclusive: set one of them"),
    ('[server.devices."gw 1"]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n' % HEX,
     "[server.devices.\"gw 1\"] device id must be 1 to 64 characters of A-Z a-z 0-9 . _ -, "
     "got 'gw 1'"),
    ('[server.devices]\ngw1 = "127.0.0.1:2301"\n',
     "[server.devices] gw1 must be a table [server.devices.gw1]"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2222"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host 127.0.0.1:2222 collides with [server] host 127.0.0.1:2222"),
    ('http = "127.0.0.1:9100"\n[server.devices.gw1]\nhost = ":9100"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host :9100 collides with [server] http 127.0.0.1:9100"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:9000"\nsecret = "%s"\n' % HEX,
     "[server.devices.gw1] host 127.0.0.1:9000 collides with [server] listen 0.0.0.0:9000"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n'
     '[server.devices.gw2]\nhost = ":2301"\nsecret = "%s"\n' % (HEX, HEX),
     "[server.devices.gw2] host :2301 collides with the host of device 'gw1' 127.0.0.1:2301"),
])
def test_device_table_errors(tmp_path, tables, expected):
    message = error_of(tmp_path, "server", "[server]\n" + tables)
    assert message == expected
    assert SHORT not in message and "1234567890123456789" not in message


def test_device_hosts_may_share_port_0_and_differ_by_address(tmp_path):
    cfg, _ = load(tmp_path, "server", """[server]
host = "127.0.0.1:0"
[server.devices.a]
host = "127.0.0.1:0"
secret = "%s"
[server.devices.b]
host = "127.0.0.2:2301"
secret = "%s"
[server.devices.c]
host = "127.0.0.1:2301"
secret = "%s"
""" % (HEX, HEX, HEX))
    assert len(cfg.server.devices) == 3


# -- the secret stays secret ---------------------------------------------------

def test_secret_never_shows_itself():
    secret = Secret(HEX.encode())
    for text in (repr(secret), str(secret), "%s" % secret, "%r" % secret, "{}".format(secret),
                 "{!r:>20}".format(secret), format(secret, "x")):
        assert HEX not in text
    assert str(secret) == repr(secret) == "<secret>"
    assert secret.reveal() == HEX.encode()
    assert secret == Secret(HEX.encode()) and secret != Secret(b"other")
    assert not (secret != Secret(HEX.encode())) and secret != HEX.encode()
    assert hash(secret) == hash(Secret(HEX.encode()))
    assert copy.copy(secret) is secret and copy.deepcopy(secret) is secret
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(secret, protocol)
    settings = build_config("device", {"device": {"id": "gw1", "secret": HEX}}, "t").device
    assert HEX not in repr(settings) and "secret=<secret>" in repr(settings)
    with pytest.raises(TypeError):
        pickle.dumps(settings)
    # The settings-change detection sees a new secret, and only a new one.
    same = build_config("device", {"device": {"id": "gw1", "secret": HEX}}, "t").device
    other = build_config("device", {"device": {"id": "gw1", "secret": HEX[::-1]}}, "t").device
    assert settings == same and settings != other


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["short secret", "short secret file", "missing secret file"])
def test_bad_secret_exits_2_with_one_line_and_no_secret(tmp_path, kind):
    path = tmp_path / "bad.toml"
    secret_path = tmp_path / "gw1.secret"
    if kind == "short secret":
        path.write_text('[device]\nid = "gw1"\nsecret = "%s"\n' % SHORT)
        expected = "[device] secret is shorter than 128 bits"
    else:
        if kind == "short secret file":
            secret_path.write_text(SHORT + "\n")
        path.write_text('[device]\nid = "gw1"\nsecret_file = "%s"\n' % secret_path)
        expected = "[device] secret_file %s: %s" % (
            secret_path, "the secret in it is shorter" if secret_path.exists() else "no such file")
    result = run_tcprc("device", "-c", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcprc: %s: %s" % (path, expected)), result.stderr
    assert SHORT not in result.stderr + result.stdout


def test_masked_command_lines():
    assert masked("config set device.secret %s" % HEX) == "config set device.secret <hidden>"
    assert masked('  CONFIG  SET "device.secret"\t"%s x"' % HEX) == '  CONFIG  SET "device.secret" <hidden>'
    assert masked("config set device.secret_file /etc/s") == "config set device.secret_file <hidden>"
    assert masked("config set device.server 1.2.3.4:9") == "config set device.server 1.2.3.4:9"


# -- config get/set through a real control socket ----------------------------------

@pytest.fixture
def control(tmp_path):
    """control(role, raw) -> (socket path, parser); apps and sockets closed at the end."""
    opened = []

    def start(role, raw, path=None):
        cfg = build_config(role, raw, "test", path)
        app = (DeviceApp if role == "device" else ServerApp)(getattr(cfg, role))
        app.start()
        opened.append(app)
        parser = CommandParser(app, cfg)
        server = ControlServer(parser, str(tmp_path / ("%s-%d.sock" % (role, len(opened)))))
        server.start()
        opened.append(server)
        return server.path, parser

    yield start
    for item in reversed(opened):
        item.close()


def test_device_secret_is_hidden_and_never_logged(control, caplog):
    sock, parser = control("device", {"device": {"id": "gw1", "secret": HEX}})
    ask = lambda line: send_command(sock, line, 5)   # noqa: E731
    assert ask("config get device.secret") == ["device.secret = <hidden>", "OK"]
    section = ask("config get device")
    assert "device.secret = <hidden>" in section and 'device.id = "gw1"' in section
    assert not [line for line in section if HEX in line]
    new = "fedcba9876543210" * 2
    assert ask("config set device.secret %s" % new) == [
        "device.secret = <hidden>: applied: a running tunnel redials with it", "OK"]
    assert parser.cfg.device.secret.reveal() == new.encode()
    assert ask("config get device.secret") == ["device.secret = <hidden>", "OK"]
    answer = ask("config set device.secret %s" % SHORT)
    assert answer == ["ERROR device.secret: secret is shorter than 128 bits: use at least 32 hex "
                      "digits or 22 other characters (e.g. openssl rand -hex 16)"]
    assert ask('config set device.secret ""') == [
        "ERROR device.secret: id 'gw1' needs secret or secret_file"]
    assert ask("config set device.secret_file /nonexistent") == [
        "ERROR device.secret_file: secret and secret_file are exclusive: set one of them"]
    assert ask("config set device.heartbeat_timeout 10") == [
        "ERROR device.heartbeat_timeout: heartbeat_timeout (10.0) must exceed heartbeat_interval (15.0)"]
    assert parser.cfg.device.secret.reveal() == new.encode()   # refused sets changed nothing
    assert "config set device.secret = <hidden>" in caplog.text
    for secret in (HEX, new, SHORT):
        assert secret not in caplog.text


def test_device_secret_file_can_be_switched_by_config_set(control, tmp_path):
    first, second = write(tmp_path / "a", HEX), write(tmp_path / "b", WORDS)
    sock, parser = control("device", {"device": {"id": "gw1", "secret_file": first}})
    assert send_command(sock, "config set device.secret_file %s" % second, 5) == [
        'device.secret_file = "%s": applied: a running tunnel redials with it' % second, "OK"]
    assert parser.cfg.device.secret.reveal() == WORDS.encode()
    # Another key keeps the secret read at start: the file is not read again.
    write(tmp_path / "b", "")
    assert send_command(sock, "config set device.window 65536", 5)[-1] == "OK"
    assert parser.cfg.device.secret.reveal() == WORDS.encode()


def test_server_devices_show_ids_and_hosts_only(control, tmp_path):
    secret_file = write(tmp_path / "gw2.secret", WORDS)
    sock, _ = control("server", {"server": {
        "listen": "127.0.0.1:0", "host": "127.0.0.1:0", "devices": {
            "gw1": {"host": "127.0.0.1:2301", "secret": HEX},
            "gw.2": {"host": "127.0.0.1:2302", "secret_file": secret_file}}}})
    ask = lambda line: send_command(sock, line, 5)   # noqa: E731
    assert ask("config get server.devices") == [
        'server.devices.gw1.host = "127.0.0.1:2301"',
        'server.devices."gw.2".host = "127.0.0.1:2302"', "OK"]
    assert ask("config get server.devices.gw1.secret") == [
        "server.devices.gw1.secret = <hidden>", "OK"]
    assert ask("config get server.devices.gw.2.secret_file") == [
        'server.devices."gw.2".secret_file = <hidden>', "OK"]
    assert ask("config get server.devices.gw.2") == [
        'server.devices."gw.2".host = "127.0.0.1:2302"', 'server.devices."gw.2".secret = <hidden>', "OK"]
    assert ask("config get server.devices.gw3") == [
        "ERROR no device 'gw3' in server.devices (known: gw.2, gw1)"]
    section = "\n".join(ask("config get server"))
    assert "server.legacy = false" in section and 'server.devices.gw1.host' in section
    for text in (HEX, WORDS, secret_file):
        assert text not in section
    assert ask("config set server.devices x") == [
        "ERROR server.devices is a set of tables: edit the configuration file and reload (SIGHUP)"]
    assert ask("config set server.host 127.0.0.1:2301") == [
        "ERROR server.host: [server.devices.gw1] host 127.0.0.1:2301 collides with "
        "[server] host 127.0.0.1:2301"]


SERVER_FILE = """\
# the server
[server]
listen = "127.0.0.1:0"
host = "127.0.0.1:0"

# gateway one
[server.devices.gw1]
host = "127.0.0.1:2301"   # its clients
secret = "%s"

[server.devices."gw.2"]
secret = "%s"
host = "127.0.0.1:2302"
""" % (HEX, WORDS)


@pytest.mark.parametrize("line, key, value", [
    ("config set server.takeover false", "takeover", False),
    ("config set server.host 127.0.0.2:0", "host", "127.0.0.2:0"),
])
def test_config_save_keeps_the_devices_tables(control, tmp_path, line, key, value):
    """A key [server] lacks in the file, one the device tables have too: each
    lands in [server], not in the device table above which it is added."""
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    path = write(tmp_path / "server.toml", SERVER_FILE.replace('%s = "127.0.0.1:0"\n' % key, ""))
    cfg = load_config(path, "server")
    _, parser = control("server", cfg.raw, path)
    assert parser.execute(line)[-1] == "OK"
    assert parser.execute("config save")[-1] == "OK"
    text = open(path).read()
    saved = tomllib.loads(text)
    assert saved["server"][key] == value
    expected = tomllib.loads(SERVER_FILE)["server"]["devices"]
    assert "[server.devices.gw1]\nhost = \"127.0.0.1:2301\"   # its clients" in text
    assert saved["server"]["devices"] == expected
    assert "# gateway one" in text and "# its clients" in text     # edited in place
    assert load_config(path, "server").server.devices == cfg.server.devices


def test_config_save_into_a_file_with_only_device_tables(control, tmp_path):
    path = write(tmp_path / "server.toml", SERVER_FILE.replace(
        '[server]\nlisten = "127.0.0.1:0"\nhost = "127.0.0.1:0"\n', ""))
    raw = load_config(path, "server").raw
    raw["server"].update(listen="127.0.0.1:0", host="127.0.0.1:0")   # as flags would
    _, parser = control("server", raw, path)
    assert parser.execute("config set server.takeover false") == [
        "server.takeover = false: applied at once", "OK"]
    assert parser.execute("config save")[-1] == "OK"
    cfg = load_config(path, "server")
    assert cfg.server.takeover is False and sorted(cfg.server.devices) == ["gw.2", "gw1"]


# -- flags ------------------------------------------------------------------------

def test_id_and_secret_file_flags(tmp_path):
    secret = write(tmp_path / "s", HEX)
    path = write(tmp_path / "d.toml", '[device]\nid = "file-id"\nsecret = "%s"\n' % WORDS)
    args = build_parser().parse_args(["device", "-c", path, "--id", "gw7", "--secret-file", secret])
    cfg = load_role_config("device", args)
    assert cfg.device.id == "gw7" and cfg.device.secret_file == secret
    assert cfg.device.secret.reveal() == HEX.encode()    # the flag's file replaces the file's secret
    assert "gw7" not in open(path).read() and cfg.raw["device"]["id"] == "file-id"
    args = build_parser().parse_args(["device", "--id", "bad id"])
    with pytest.raises(ConfigError, match=r"^--id: must be 1 to 64 characters"):
        load_role_config("device", args)


@pytest.mark.e2e
def test_secret_file_flag_of_a_real_process(tmp_path):
    missing = str(tmp_path / "gone.secret")
    result = run_tcprc("device", "--id", "gw1", "--secret-file", missing)
    assert result.returncode == 2
    assert result.stderr.strip() == "tcprc: command line: [device] secret_file %s: no such file" % missing


# -- status formatting ----------------------------------------------------------------

def test_status_v2_values():
    assert _format_status_value("rtt", 0.0123) == "12.3 ms"
    assert _format_status_value("rtt", 0.00004) == "0.0 ms"
    assert _format_status_value("rtt", 2.5) == "2.50 s"
    assert _format_status_value("rtt", None) == "-"
    assert _format_status_value("protocol", "") == "-"
    assert _format_status_value("protocol", "v2") == "v2"
    assert _format_status_value("tls", "TLSv1.3") == "TLSv1.3"
    assert _format_status_value("device_id", "gw1") == "gw1"


class StatusOnly:
    """An app that has only a status (the formatting is under test, not the app)."""

    def __init__(self, status):
        self._status = status

    def status(self):
        return dict(self._status)


def test_status_order_with_v2_keys():
    status = {"uptime": 5, "rtt": 0.0021, "tls": "off", "device_id": "", "protocol": "legacy",
              "state": "up", "server": "1.2.3.4:9", "local": "127.0.0.1:23", "clients": 0,
              "bytes_up": 1, "bytes_down": 2, "last_error": None}
    parser = CommandParser(StatusOnly(status), build_config("device", {}, "t"))
    assert parser.execute("status") == [
        "state: up", "protocol: legacy", "tls: off", "server: 1.2.3.4:9", "device_id: -",
        "local: 127.0.0.1:23", "clients: 0", "bytes_up: 1", "bytes_down: 2", "rtt: 2.1 ms",
        "uptime: 5s", "last_error: -", "OK"]


def test_relative_secret_and_tls_files_are_read_beside_the_config_file(tmp_path, monkeypatch):
    from tcprc.ops.config import load_config
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "gw1.secret").write_text("correct-horse-battery-staple-42\n")
    (conf / "gw1.secret").chmod(0o600)
    (conf / "tcprc.toml").write_text('[device]\nid = "gw1"\nsecret_file = "gw1.secret"\n')
    (conf / "server.toml").write_text(
        '[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret_file = "gw1.secret"\n')
    monkeypatch.chdir("/")   # as a daemon does before a reload
    device = load_config(str(conf / "tcprc.toml"), "device").device
    assert device.secret.reveal() == b"correct-horse-battery-staple-42"
    server = load_config(str(conf / "server.toml"), "server").server
    assert server.devices["gw1"].secret.reveal() == b"correct-horse-battery-staple-42"
