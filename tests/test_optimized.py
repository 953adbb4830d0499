"""tcprc under `python -OO` (PYTHONOPTIMIZE=2: no docstrings, no asserts), the
smaller way README's "Smaller still" offers: a real server and device, an id
and TLS, carry a client; `ctl` reads their status; both stop cleanly."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from support.agents import run_tcprc
from support.net import free_port, listening, recv_exactly
from support.tls import shared_pki
from support.waiting import wait_for

pytestmark = pytest.mark.e2e   # real processes

OPTIMIZED = {"PYTHONOPTIMIZE": "2"}
SECRET = "o" * 24


def test_interpreter_honours_the_setting():
    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.flags.optimize)"],
                         env=dict(os.environ, **OPTIMIZED), stdout=subprocess.PIPE, timeout=30)
    assert out.stdout.strip() == b"2"


def test_a_tls_tunnel_with_an_id_runs_under_python_oo(agents, service):
    pki = shared_pki()
    listen, host = free_port(), free_port()
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % free_port(),
                          env=OPTIMIZED, config='[server]\ntls_cert = "%s"\ntls_key = "%s"\n'
                          '[server.devices.gw-oo]\nsecret = "%s"\nhost = "127.0.0.1:%d"\n'
                          % (pki.path("ca/localhost.crt"), pki.path("ca/localhost.key"), SECRET, host))
    wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen, "--local", "%s:%d" % service.address,
                          env=OPTIMIZED, config='[device]\nid = "gw-oo"\nsecret = "%s"\ntls = true\n'
                          'tls_ca = "%s"\ntls_server_name = "localhost"\n' % (SECRET, pki.path("ca/ca.crt")))
    wait_for(lambda: listening(host) or device.poll() is not None, what="the device's host port")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"under -OO" * 1000)
        assert recv_exactly(conn, 9000) == b"under -OO" * 1000
    for proc, says in ((server, "devices: 1 up of 1 configured"), (device, "tls: TLSv1")):
        with open("/proc/%d/environ" % proc.pid, "rb") as handle:
            assert b"PYTHONOPTIMIZE=2" in handle.read().split(b"\0")
        status = run_tcprc("ctl", "--socket", proc.control_socket, "status",
                           env=dict(os.environ, **OPTIMIZED))
        assert status.returncode == 0 and says in status.stdout, status.stdout + status.stderr
    for proc in (device, server):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, agents.log(proc)
        assert "Traceback" not in agents.log(proc)
