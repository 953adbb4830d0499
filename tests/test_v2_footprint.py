"""What protocol v2 costs an idle device: a v2 session without an id loads no
OpenSSL.  hmac imports _hashlib, which maps libcrypto (3.7 MB of RSS measured
on a 13.5 MB interpreter); only a session with an id needs it."""

import importlib.util
import socket

import pytest

from support.agents import start_tunnel
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
