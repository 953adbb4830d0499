"""What protocol v2 and TLS cost an idle device: a v2 session without an id loads no
OpenSSL.  hmac imports _hashlib, which maps libcrypto (3.7 MB of RSS measured
on a 13.5 MB interpreter); only a session with an id needs it.  TLS loads only
what a handshake needs."""

import importlib.util
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
