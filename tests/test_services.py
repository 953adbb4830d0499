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


# ---- steps 2 and 3: the server's service ports, the device's policy ---------------------

import hashlib      # noqa: E402  (the functional tests' own imports)
import socket       # noqa: E402
import struct       # noqa: E402

from support.net import free_port, recv_exactly    # noqa: E402
from support.services import Service, pattern      # noqa: E402
from support.tunnel import settings, start_device   # noqa: E402
from support.waiting import wait_for               # noqa: E402
from tcprc.device.app import DeviceApp             # noqa: E402
from tcprc.server.app import ServerApp             # noqa: E402


def _server_settings(services, **keys):
    """gw1 with `services` {name: host}: its host and every service on 127.0.0.1."""
    table = {"secret": SECRET, "host": "127.0.0.1:0",
             "services": {name: {"host": host} for name, host in services.items()}}
    return settings("server", **dict({"listen": "127.0.0.1:0", "host": "127.0.0.1:0",
                                      "devices": {"gw1": table}}, **keys))


def _device_app(server, local, services, **keys):
    return start_device(server, local, **dict({
        "id": "gw1", "secret": SECRET,
        "services": {name: {"local": "%s:%d" % address} for name, address in services.items()}},
        **keys))


def _echo(address, data=b"through the main host"):
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(data)
        assert recv_exactly(conn, len(data)) == data


def _source(address, count=300000):
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(struct.pack("!Q", count))
        assert recv_exactly(conn, count) == pattern(count)


def _sink(address, count=200000):
    data = pattern(count, seed=3)
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(struct.pack("!Q", count) + data)
        assert recv_exactly(conn, 32) == hashlib.sha256(data).digest()


def _closed_at_once(address):
    """A client on `address` is accepted and then closed without a byte."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(b"anyone?")
        try:
            return conn.recv(100) == b""
        except ConnectionResetError:
            return True


def _refused(address):
    try:
        socket.create_connection(address, timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):   # reset: closed with us in its backlog
        return True
    return False


@pytest.fixture
def services():
    made = {"src": Service("source"), "snk": Service("sink")}
    yield made
    for svc in made.values():
        svc.close()


@pytest.fixture
def fleet(service, services):
    """A server with gw1 and its services src and snk (fixed ports), the device gw1
    with the same two services and `local` = the echo service; both up."""
    ports = {"src": "127.0.0.1:%d" % free_port(), "snk": "127.0.0.1:%d" % free_port()}
    server = ServerApp(_server_settings(ports))
    server.start()
    device = _device_app(server, service.address,
                         {name: svc.address for name, svc in services.items()})
    wait_for(lambda: server.service_address("gw1", "src") and server.service_address("gw1", "snk"),
             what="gw1's services open")
    yield server, device, ports
    device.close()
    server.close()


def _address(host):
    addr, port = host.rsplit(":", 1)
    return addr, int(port)


def test_each_service_has_its_port_and_reaches_its_local(fleet, service, services):
    server, device, ports = fleet
    _source(_address(ports["src"]))
    _sink(_address(ports["snk"]))
    _echo(server.device_host_address("gw1"))   # the main host still reaches `local`
    assert (services["src"].accepted, services["snk"].accepted, service.accepted) == (1, 1, 1)
    row = {row["id"]: row for row in server.devices()}["gw1"]
    assert row["services"] == "snk=%s, src=%s" % (ports["snk"], ports["src"])
    link = server.link_on("gw1")
    before = link.stats()["bytes_sent"]
    status = server.status()   # one session, its bytes counted once (not once per port)
    assert before <= status["bytes_down"] <= link.stats()["bytes_sent"]
    # The server's status is the server's: [server] host is not gw1's port.
    assert status["sessions"] == 1 and status["host"] == "" and status["devices"] == "1 up of 1 configured"
    # Both services at once, and the main host, over the one uplink.
    import threading
    errors = []

    def run(job, address):
        try:
            job(address)
        except Exception as exc:   # reported below, with the others
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(job, address)) for job, address in
               [(_source, _address(ports["src"])), (_sink, _address(ports["snk"])),
                (_echo, server.device_host_address("gw1"))] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert (services["src"].accepted, services["snk"].accepted, service.accepted) == (4, 4, 4)
    # The session's end closes every port it had.
    device.close()
    wait_for(lambda: all(_refused(_address(host)) for host in ports.values()),
             what="the service ports closed with the session")
    assert server.service_address("gw1", "src") is None


def test_a_service_the_device_does_not_have_is_refused(service, services, caplog):
    ports = {"src": "127.0.0.1:%d" % free_port(), "ghost": "127.0.0.1:%d" % free_port()}
    server = ServerApp(_server_settings(ports))
    server.start()
    device = _device_app(server, service.address, {"src": services["src"].address})
    try:
        wait_for(lambda: server.service_address("gw1", "ghost"), what="the ghost port open")
        for _ in range(3):
            assert _closed_at_once(_address(ports["ghost"]))
        wait_for(lambda: caplog.text.count("the device could not open it: not allowed: "
                                           "CONNECT to service 'ghost': no such service in "
                                           "[device.services]") == 3,
                 what="the server's three lines")
        assert "CONNECT to service 'ghost': no such service in [device.services]" in \
            "".join(r.getMessage() for r in caplog.records if r.name == "tcprc.device")
        # Nothing was dialed for it; the session and the other ports carry on.
        assert (service.accepted, services["src"].accepted) == (0, 0)
        _source(_address(ports["src"]))
        _echo(server.device_host_address("gw1"))
        # The device learns the service (SIGHUP, config): it redials, and it works.
        link = server.link_on("gw1")
        device.apply_settings(device.settings._replace(services={
            "src": "%s:%d" % services["src"].address, "ghost": "%s:%d" % services["snk"].address}))
        wait_for(lambda: server.link_on("gw1") not in (None, link)
                 and server.service_address("gw1", "ghost"), what="the device's new session")
        _sink(_address(ports["ghost"]))
    finally:
        device.close()
        server.close()


def test_a_service_removed_on_the_server_closes_its_port_live(fleet, services, caplog):
    server, device, ports = fleet
    link = server.link_on("gw1")
    with socket.create_connection(_address(ports["snk"]), timeout=10) as open_client:
        extra = "127.0.0.1:%d" % free_port()
        server.apply_settings(_server_settings({"src": ports["src"], "more": extra}))
        wait_for(lambda: _refused(_address(ports["snk"])), what="snk's port closed")
        wait_for(lambda: server.service_address("gw1", "more"), what="the added port open")
        assert server.link_on("gw1") is link            # the session stayed up
        _source(_address(ports["src"]))
        # The device has no "more": refused, and said so.
        assert _closed_at_once(_address(extra))
        # A client that came before the removal keeps its stream.
        data = pattern(5000, seed=9)
        open_client.sendall(struct.pack("!Q", len(data)) + data)
        assert recv_exactly(open_client, 32) == hashlib.sha256(data).digest()
    assert "service snk closed" in caplog.text
    row = {row["id"]: row for row in server.devices()}["gw1"]
    assert row["services"] == "more=%s, src=%s" % (extra, ports["src"])


def test_takeover_by_the_same_id_takes_every_service_port(fleet, service, caplog):
    server, first, ports = fleet
    old = server.link_on("gw1")
    # The first device waits long before it redials: the newcomer keeps the ports.
    first.apply_settings(first.settings._replace(reconnect_min=30.0, reconnect_max=30.0))
    other_src, other_snk = Service("source"), Service("sink")
    second = _device_app(server, service.address, {"src": other_src.address,
                                                   "snk": other_snk.address})
    try:
        wait_for(lambda: server.link_on("gw1") not in (None, old)
                 and server.service_address("gw1", "src") and server.service_address("gw1", "snk"),
                 what="the second session holding every port")
        _source(_address(ports["src"]))
        _sink(_address(ports["snk"]))
        assert (other_src.accepted, other_snk.accepted) == (1, 1)
        assert "takes over the tunnel" in caplog.text
    finally:
        second.close()
        other_src.close()
        other_snk.close()


def test_an_identity_less_session_gets_no_service_port(service, services):
    """Services are a configured device's: [server] host's session (no id) has none,
    and the device's services stay shut while only it is up."""
    ports = {"src": "127.0.0.1:%d" % free_port()}
    server = ServerApp(_server_settings(ports, legacy=True))
    server.start()
    anon = DeviceApp(settings("device", server="%s:%d" % server.listen_address,
                              local="%s:%d" % service.address, reconnect_min=0.05,
                              services={"src": {"local": "%s:%d" % services["src"].address}}))
    anon.start()
    try:
        wait_for(lambda: server.host_address, what="the identity-less session")
        _echo(server.host_address)
        assert _refused(_address(ports["src"]))
    finally:
        anon.close()
        server.close()
