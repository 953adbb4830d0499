"""Named services per device (issue 13 item 1): [device.services.NAME] local and
[server.devices.ID.services.NAME] host; over real sockets, real threads."""

import pytest

from tcprc.ops.commands import CommandParser
from tcprc.ops.config import ConfigError, build_config, load_config
from tcprc.ops.devdir import read_device_file

SECRET = "correct-horse-battery-staple-42"


def _load(tmp_path, role, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(str(path), role)


def _error(tmp_path, role, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), role)
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    return message[len(str(path)) + 2:]


# ---- step 1: configuration ----------------------------------------------------------

def test_device_services_tables(tmp_path):
    cfg = _load(tmp_path, "device", """[device]
local = "127.0.0.1:23"
[device.services.web]
local = "127.0.0.1:80"
[device.services."ssh.v2"]
local = "localhost:22"
""")
    assert dict(cfg.device.services) == {"web": "127.0.0.1:80", "ssh.v2": "localhost:22"}
    with pytest.raises(TypeError):
        cfg.device.services["x"] = "127.0.0.1:1"     # settings are read-only
    assert dict(build_config("device", {}, "t").device.services) == {}
    lines = CommandParser(None, cfg).execute("config get device.services")
    assert lines[:2] == ['device.services."ssh.v2".local = "localhost:22"',
                         'device.services.web.local = "127.0.0.1:80"']
    assert "device.services = (none)" in CommandParser(None, build_config("device", {}, "t")) \
        .execute("config get device")


def test_server_device_services_tables(tmp_path):
    cfg = _load(tmp_path, "server", """[server]
[server.devices.gw1]
host = "127.0.0.1:2301"
secret = "%s"
[server.devices.gw1.services.web]
host = "127.0.0.1:2380"
[server.devices.gw1.services.api]
host = "127.0.0.1:0"
[server.devices.gw2]
host = "127.0.0.1:2302"
secret = "%s"
""" % (SECRET, SECRET))
    devices = cfg.server.devices
    assert dict(devices["gw1"].services) == {"web": "127.0.0.1:2380", "api": "127.0.0.1:0"}
    assert dict(devices["gw2"].services) == {}
    lines = CommandParser(None, cfg).execute("config get server.devices.gw1")
    assert lines == ['server.devices.gw1.host = "127.0.0.1:2301"',
                     "server.devices.gw1.secret = <hidden>",
                     'server.devices.gw1.services.api.host = "127.0.0.1:0"',
                     'server.devices.gw1.services.web.host = "127.0.0.1:2380"', "OK"]


def test_device_files_carry_services(tmp_path):
    path = tmp_path / "gw7.toml"
    path.write_text('host = "127.0.0.1:2307"\nsecret = "%s"\n'
                    '[services.web]\nhost = "127.0.0.1:2387"\n' % SECRET)
    assert dict(read_device_file("gw7", str(path)).services) == {"web": "127.0.0.1:2387"}
    path.write_text('host = "127.0.0.1:2307"\nsecret = "%s"\n'
                    '[services.web]\nhost = "nowhere"\n' % SECRET)
    with pytest.raises(ConfigError) as info:
        read_device_file("gw7", str(path))
    assert str(info.value) == ("%s: [server.devices.gw7.services.web] host expected ADDR:PORT, "
                               "got 'nowhere' (no port)" % path)


_GW1 = '[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n' % SECRET


@pytest.mark.parametrize("tables, expected", [
    (_GW1 + '[server.devices.gw1.services.web]\nhost = "127.0.0.1:2301"\n',
     "[server.devices.gw1.services.web] host 127.0.0.1:2301 collides with the host of device "
     "'gw1' 127.0.0.1:2301"),
    (_GW1 + '[server.devices.gw1.services.web]\nhost = "127.0.0.1:2222"\n',
     "[server.devices.gw1.services.web] host 127.0.0.1:2222 collides with [server] host "
     "127.0.0.1:2222"),
    (_GW1 + '[server.devices.gw1.services.a]\nhost = "127.0.0.1:2380"\n'
     '[server.devices.gw1.services.b]\nhost = ":2380"\n',
     "[server.devices.gw1.services.b] host :2380 collides with service 'a' of device 'gw1' "
     "127.0.0.1:2380"),
    (_GW1 + '[server.devices.gw1.services.web]\nhost = "127.0.0.1:2380"\n'
     '[server.devices.gw2]\nhost = "127.0.0.1:2380"\nsecret = "%s"\n' % SECRET,
     "[server.devices.gw2] host 127.0.0.1:2380 collides with service 'web' of device 'gw1' "
     "127.0.0.1:2380"),
    (_GW1 + '[server.devices.gw1.services."a b"]\nhost = "127.0.0.1:2380"\n',
     "[server.devices.gw1] service name must be 1 to 32 characters of A-Z a-z 0-9 . _ -, "
     "got 'a b'"),
    (_GW1 + '[server.devices.gw1.services.%s]\nhost = "127.0.0.1:2380"\n' % ("x" * 33),
     "[server.devices.gw1] service name must be 1 to 32 characters of A-Z a-z 0-9 . _ -, "
     "got '%s'" % ("x" * 33)),
    (_GW1 + '[server.devices.gw1.services]\nweb = "127.0.0.1:2380"\n',
     "[server.devices.gw1] services.web must be a table [server.devices.gw1.services.web]"),
    (_GW1 + '[server.devices.gw1.services.web]\nlocal = "127.0.0.1:2380"\n',
     "[server.devices.gw1.services.web] unknown key 'local' (known: host)"),
    (_GW1 + '[server.devices.gw1.services.web]\n',
     "[server.devices.gw1.services.web] host is required (ADDR:PORT)"),
    (_GW1 + '[server.devices.gw1.services.web]\nhost = 2380\n',
     "[server.devices.gw1.services.web] host must be a string, got 2380"),
])
def test_server_service_errors(tmp_path, tables, expected):
    assert _error(tmp_path, "server", "[server]\n" + tables) == expected


@pytest.mark.parametrize("tables, expected", [
    ('[device.services.web]\nlocal = "127.0.0.1:0"\n',
     "[device.services.web] local port 0 is out of range 1..65535"),
    ('[device.services.web]\nlocal = ":80"\n',
     "[device.services.web] local expected ADDR:PORT, got ':80' (no address)"),
    ('[device.services.web]\nhost = "127.0.0.1:80"\n',
     "[device.services.web] unknown key 'host' (known: local)"),
    ('[device.services."we/b"]\nlocal = "127.0.0.1:80"\n',
     "[device] service name must be 1 to 32 characters of A-Z a-z 0-9 . _ -, got 'we/b'"),
    ('[device]\nservices = "web"\n',
     "[device] services must be a table, got 'web'"),
])
def test_device_service_errors(tmp_path, tables, expected):
    assert _error(tmp_path, "device", tables) == expected


def test_a_device_file_whose_service_port_is_taken_is_skipped(tmp_path, caplog):
    from support.net import free_port
    from tcprc.ops.devdir import DeviceFiles
    from tcprc.server.app import ServerApp
    from support.tunnel import settings
    taken = free_port()
    (tmp_path / "gw8.toml").write_text('host = "127.0.0.1:%d"\nsecret = "%s"\n'
                                       '[services.web]\nhost = "127.0.0.1:%d"\n'
                                       % (free_port(), SECRET, taken))
    (tmp_path / "gw9.toml").write_text('host = "127.0.0.1:%d"\nsecret = "%s"\n'
                                       '[services.a]\nhost = "127.0.0.1:%d"\n'
                                       '[services.b]\nhost = "127.0.0.1:%d"\n'
                                       % (free_port(), SECRET, taken + 1, taken + 1))
    app = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:%d" % taken,
                             devices_dir=str(tmp_path)), device_files=DeviceFiles)
    try:
        assert [row["id"] for row in app.devices()] == []
        text = caplog.text
        assert ("devices_dir: device gw8 skipped: its service web's host 127.0.0.1:%d is the "
                "port of [server] host" % taken) in text
        assert ("devices_dir: device gw9 skipped: its service b's host 127.0.0.1:%d is the "
                "port of service a of device gw9" % (taken + 1)) in text
    finally:
        app.close()
