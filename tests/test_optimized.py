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


def start_device(agents, env):
    device = agents.start("device", "--server", "127.0.0.1:%d" % free_port(), "--local", "127.0.0.1:1",
                          env=dict(OPTIMIZED, **env))
    wait_for(lambda: "agent running" in agents.log(device) or device.poll() is not None,
             what="the device to run")
    device.send_signal(signal.SIGTERM)
    assert device.wait(10) == 0, agents.log(device)
    return agents.log(device)


def test_a_start_that_compiles_what_it_imports_says_so_in_one_line(agents, tmp_path):
    """No .opt-2.pyc to read (here: an empty cache directory), none written (as a
    distribution's standard library under a unit's read-only file system): the
    agent runs, and one WARNING says what it costs and what to do."""
    log = start_device(agents, {"PYTHONPYCACHEPREFIX": str(tmp_path / "empty"), "PYTHONDONTWRITEBYTECODE": "1"})
    lines = [line for line in log.splitlines() if "no current .opt-2.pyc" in line]
    assert len(lines) == 1, log
    assert " WARNING " in lines[0] and "-OO -m compileall -q DIR" in lines[0]
    assert "tcprc" in lines[0] and "unset PYTHONOPTIMIZE" in lines[0]


def test_no_warning_once_the_byte_code_is_there(agents, tmp_path):
    cache = str(tmp_path / "cache")
    first = start_device(agents, {"PYTHONPYCACHEPREFIX": cache, "PYTHONDONTWRITEBYTECODE": ""})   # writes it
    second = start_device(agents, {"PYTHONPYCACHEPREFIX": cache, "PYTHONDONTWRITEBYTECODE": "1"})
    for log in (first, second):
        assert "agent running" in log and ".opt-2.pyc" not in log, log


def test_stale_or_missing_byte_code_is_told_apart_from_current(tmp_path):
    import py_compile
    import types
    from tcprc.ops.bytecode import compiled_from_source
    source = tmp_path / "mod.py"
    source.write_text("X = 1\n")
    cached = str(tmp_path / "mod.pyc")
    module = types.SimpleNamespace(__file__=str(source), __cached__=cached)
    assert compiled_from_source([module]) == [(str(source), cached)]            # none
    py_compile.compile(str(source), cfile=cached)
    assert compiled_from_source([module]) == []                                 # current
    source.write_text("X = 22\n")
    os.utime(str(source), (1, 1))
    assert compiled_from_source([module]) == [(str(source), cached)]            # stale
    py_compile.compile(str(source), cfile=cached, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    assert compiled_from_source([module]) == []                                 # by hash, not by date
    assert compiled_from_source([types.SimpleNamespace(__file__="x.pyc", __cached__=None), sys]) == []
