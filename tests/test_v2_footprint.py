"""What protocol v2 and TLS cost an idle device: a v2 session loads no OpenSSL,
with an id or without.  hmac imports _hashlib, which maps libcrypto (3.7 MB
of RSS); the handshake's HMAC-SHA256 runs on the interpreter's builtin SHA-256
(wire.mac).  TLS loads only what a handshake needs."""

import importlib.util
import re
import socket

import pytest

from support.agents import start_tunnel
from support.net import free_port, listening
from support.tls import shared_pki
from support.net import recv_exactly
from support.waiting import wait_for

pytestmark = pytest.mark.e2e   # real processes

_HASHLIB = importlib.util.find_spec("_hashlib")


def mapped(pid, name):
    with open("/proc/%d/maps" % pid) as maps:
        return any(name in line for line in maps)


def imported(log):
    """The modules a process imported, from its PYTHONPROFILEIMPORTTIME lines (stderr)."""
    return set(re.findall(r"^import time:.*\|\s+([\w.]+)\s*$", log, re.M))


@pytest.mark.skipif(_HASHLIB is None or not str(_HASHLIB.origin).endswith(".so"),
                    reason="_hashlib is not a shared module in this interpreter")
def test_a_v2_device_without_id_maps_no_openssl(agents, service):
    _, device, host = start_tunnel(agents, service.address)
    wait_for(lambda: "protocol v2" in agents.log(device), what="the v2 session")
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(b"over v2")
        assert recv_exactly(conn, 7) == b"over v2"
    assert not mapped(device.pid, "_hashlib"), "the device loaded OpenSSL's hashlib"


@pytest.mark.skipif(_HASHLIB is None or not str(_HASHLIB.origin).endswith(".so"),
                    reason="_hashlib is not a shared module in this interpreter")
def test_a_tls_device_checking_a_ca_loads_neither_hashlib_nor_the_idna_codec(agents, service):
    """hashlib only for a pin (~0.6 MB), and the server name handed to ssl as
    bytes: as a str it is IDNA-encoded, which loads unicodedata (~0.3 MB)."""
    pki = shared_pki()
    listen, host = free_port(), free_port()
    agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % host,
                 config='[server]\ntls_cert = "%s"\ntls_key = "%s"\n'
                 % (pki.path("ca/localhost.crt"), pki.path("ca/localhost.key")))
    wait_for(lambda: listening(listen), what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen,
                          "--local", "%s:%d" % service.address,
                          config='[device]\ntls = true\ntls_ca = "%s"\ntls_server_name = "localhost"\n'
                          % pki.path("ca/ca.crt"))
    wait_for(lambda: listening(host), what="the host port")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"over tls")
        assert recv_exactly(conn, 8) == b"over tls"
    assert "TLSv1" in agents.log(device) or mapped(device.pid, "libssl")
    assert not mapped(device.pid, "_hashlib"), "the device loaded hashlib"
    assert not mapped(device.pid, "unicodedata"), "the device loaded the idna codec"


def test_a_device_with_an_id_authenticates_without_openssl(agents, service):
    """A real device with an id and a secret, proven to a real server: no libcrypto
    mapped, and (every import it made, as -X importtime reports them) neither
    hmac nor hashlib imported."""
    listen, host = free_port(), free_port()
    agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % free_port(),
                 config='[server]\nlegacy = false\n[server.devices.gw-7]\nsecret = "%s"\n'
                 'host = "127.0.0.1:%d"\n' % ("s" * 24, host))
    wait_for(lambda: listening(listen), what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen,
                          "--local", "%s:%d" % service.address,
                          config='[device]\nid = "gw-7"\nsecret = "%s"\n' % ("s" * 24),
                          env={"PYTHONPROFILEIMPORTTIME": "1"})
    wait_for(lambda: listening(host), what="the device's own host port (it authenticated)")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"with an id")
        assert recv_exactly(conn, 10) == b"with an id"
    log = agents.log(device)
    assert "protocol v2" in log
    modules = imported(log)
    assert {"tcprc.wire.handshake", "tcprc.wire.mac"} <= modules, "no import lines: %s" % log[-300:]
    assert not {"hmac", "hashlib", "_hashlib"} & modules, sorted(modules)
    assert not mapped(device.pid, "libcrypto"), "the device mapped OpenSSL's libcrypto"
