"""A device, and a server without [cluster], never load the cluster: not its
modules, nor http.client, json or base64 (which only the cluster's etcd client
needs).  Real `tcprc` processes with -X importtime (PYTHONPROFILEIMPORTTIME),
carrying a v2 tunnel with an identity, then stopped by SIGTERM."""

import signal
import socket

import pytest

from support.net import free_port, listening, recv_exactly
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

HEX = "0123456789abcdef" * 2
CLUSTER_ONLY = ("http.client", "json", "base64")


def imported(log_text):
    """Every module the process imported, from its -X importtime lines."""
    return {line.rsplit("|", 1)[-1].strip() for line in log_text.splitlines()
            if line.startswith("import time:") and "|" in line} - {"imported package"}


def test_neither_a_device_nor_a_server_without_cluster_imports_it(agents, service):
    listen, host = free_port(), free_port()
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, env=env, config=(
        '[server]\nhost = "127.0.0.1:%d"\n[server.devices.gw1]\nhost = "127.0.0.1:%d"\n'
        'secret = "%s"\n' % (free_port(), host, HEX)))
    wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen,
                          "--local", "%s:%d" % service.address, env=env,
                          config='[device]\nid = "gw1"\nsecret = "%s"\n' % HEX)
    wait_for(lambda: listening(host) or device.poll() is not None, what="the device's host port")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"through the tunnel")
        assert recv_exactly(conn, 18) == b"through the tunnel"
    for proc in (device, server):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    for proc, role in ((server, "server"), (device, "device")):
        modules = imported(agents.log(proc))
        assert "tcprc.cli" in modules and "socket" in modules, role   # importtime worked
        assert "tcprc.%s.app" % role in modules, role
        assert not [m for m in modules if m == "tcprc.cluster" or m.startswith("tcprc.cluster.")], role
        assert not set(CLUSTER_ONLY) & modules, (role, sorted(set(CLUSTER_ONLY) & modules))
