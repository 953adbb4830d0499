"""etc/init.d/tcprc, run for real under dash and busybox ash, with and without
start-stop-daemon (Debian's and busybox's), in a temporary directory.

The Gateway helper lives in support/gateway.py (test_watchdog.py uses it too).
"""

import os
import shutil
import signal
import socket
import sys
import time

import pytest

from support.gateway import INIT, Gateway, alive
from support.net import free_port
from support.waiting import wait_for

pytestmark = pytest.mark.e2e   # real processes throughout


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path)
    yield gw
    gw.cleanup()


def make_gateway(tmp_path, request, **kwargs):
    gw = Gateway(tmp_path, **kwargs)
    request.addfinalizer(gw.cleanup)
    return gw


@pytest.mark.parametrize("ssd", ["debian", "busybox", "none"])
@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
def test_lifecycle(tmp_path, request, shell, ssd):
    gw = make_gateway(tmp_path, request, ssd=ssd)
    res = gw.init("status", shell)
    assert res.returncode == 3, res.stdout
    assert "stopped" in res.stdout

    res = gw.init("start", shell)
    assert res.returncode == 0, res.stdout
    pid = gw.pid()
    assert pid and "started (pid %d)" % pid in res.stdout
    assert gw.agents() == [pid]

    res = gw.init("start", shell)
    assert res.returncode == 0, res.stdout
    assert "already running (pid %d)" % pid in res.stdout
    assert gw.agents() == [pid] and gw.pid() == pid

    res = gw.init("status", shell)
    assert res.returncode == 0 and "running (pid %d)" % pid in res.stdout

    began = time.monotonic()
    res = gw.init("stop", shell)
    assert res.returncode == 0, res.stdout
    assert time.monotonic() - began < 3.0
    assert not alive(pid) and gw.agents() == []
    assert not gw.pidfile.exists()
    assert "signal 15: stopping" in gw.log_text()

    res = gw.init("status", shell)
    assert res.returncode == 3, res.stdout
    res = gw.init("stop", shell)
    assert res.returncode == 0 and "not running" in res.stdout

    used = gw.ssd_log.read_text() if gw.ssd_log.exists() else ""
    if ssd == "none":
        assert used == ""
    else:
        assert "-S " in used and "-K " in used


def test_start_takes_over_after_kill9(gateway):
    assert gateway.init("start").returncode == 0
    old = gateway.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old))
    res = gateway.init("status")
    assert res.returncode == 1 and "dead" in res.stdout, res.stdout
    res = gateway.init("start")
    assert res.returncode == 0, res.stdout
    new = gateway.pid()
    assert new != old and gateway.agents() == [new]


def test_agent_runs_with_the_small_gateway_malloc_settings(gateway):
    env = {k: v for k, v in gateway.env.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    gateway.env = env
    assert gateway.init("start").returncode == 0
    with open("/proc/%d/environ" % gateway.pid(), "rb") as handle:
        environ = handle.read().split(b"\0")
    assert b"MALLOC_ARENA_MAX=1" in environ
    assert b"GLIBC_TUNABLES=glibc.pthread.stack_cache_size=0" in environ
    assert not [v for v in environ if v.startswith(b"PYTHONOPTIMIZE=")]   # only on request
    assert gateway.init("stop").returncode == 0


def test_pythonoptimize_in_the_defaults_file_reaches_the_agent(gateway):
    """README "Smaller still": one line in /etc/default/tcprc, which the script sources."""
    gateway.env = {k: v for k, v in gateway.env.items() if k != "PYTHONOPTIMIZE"}
    gateway.defaults.write_text(gateway.defaults.read_text() + "PYTHONOPTIMIZE=2\n")
    assert gateway.init("start").returncode == 0
    with open("/proc/%d/environ" % gateway.pid(), "rb") as handle:
        assert b"PYTHONOPTIMIZE=2" in handle.read().split(b"\0")
    assert gateway.init("stop").returncode == 0


def test_restart_and_reload(gateway):
    assert gateway.init("reload").returncode == 7
    assert gateway.init("start").returncode == 0
    old = gateway.pid()
    gateway.write_config(level="debug")
    res = gateway.init("reload")
    assert res.returncode == 0, res.stdout
    wait_for(lambda: "reloaded %s" % gateway.conf in gateway.log_text())
    assert gateway.agents() == [old]
    res = gateway.init("restart")
    assert res.returncode == 0, res.stdout
    new = gateway.pid()
    assert new != old and gateway.agents() == [new] and not alive(old)
    assert gateway.init("stop").returncode == 0


@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
def test_stop_kills_an_agent_that_ignores_sigterm(tmp_path, request, shell):
    gw = make_gateway(tmp_path, request, ssd="none")
    # A hung agent: detached and pidfile-locked by tcprc.ops, deaf to SIGTERM.
    hung = gw._script("tcprc-hung", 'exec "%s" -c "%s" tcprc "$@"' % (sys.executable, "; ".join([
        "import signal, sys, time",
        "from tcprc.ops.detach import detach",
        "from tcprc.ops.pidfile import PidFile",
        "report = detach()",
        "PidFile(sys.argv[sys.argv.index('--pidfile') + 1]).acquire()",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        "report.ok()",
        "time.sleep(60)"])))
    env = {"TCPRC_DAEMON": str(hung), "TCPRC_CONF": str(gw.conf), "TCPRC_STOP_TIMEOUT": "1"}
    gw.defaults.write_text("TCPRC_PIDFILE=%s\n" % gw.pidfile)
    assert gw.init("start", shell, env).returncode == 0
    pid = gw.pid()
    assert alive(pid)
    began = time.monotonic()
    res = gw.init("stop", shell, env)
    assert res.returncode == 0, res.stdout
    assert "killing it" in res.stdout
    assert 1.0 <= time.monotonic() - began < 4.0
    assert not alive(pid) and not gw.pidfile.exists()


def test_start_reports_bad_config_and_missing_program(gateway):
    gateway.conf.write_text('[device]\nlocal = "nowhere"\n')
    res = gateway.init("start")
    assert res.returncode == 6, res.stdout
    assert str(gateway.conf) in res.stdout and "local" in res.stdout
    assert "Traceback" not in res.stdout
    assert gateway.agents() == [] and gateway.init("status").returncode == 3

    gateway.defaults.write_text("")   # it would set TCPRC_DAEMON
    res = gateway.init("start", env={"TCPRC_DAEMON": str(gateway.dir / "no-such-tcprc")})
    assert res.returncode == 5 and "not installed" in res.stdout, res.stdout
    assert gateway.init("bogus").returncode == 2


def test_ssd_can_be_turned_off(tmp_path, request):
    gw = make_gateway(tmp_path, request, ssd="debian")
    assert gw.init("start", env={"TCPRC_SSD": "no"}).returncode == 0
    assert gw.init("stop", env={"TCPRC_SSD": "no"}).returncode == 0
    assert not gw.ssd_log.exists()


def test_opts_and_role_reach_the_agent(tmp_path, request):
    gw = make_gateway(tmp_path, request, role="server")
    # A copy named tcprc-server runs the server role without TCPRC_ROLE.
    del gw.env["TCPRC_ROLE"]
    script = tmp_path / "tcprc-server"
    shutil.copy(str(INIT), str(script))
    listen = gw.conf.read_text().split('listen = "127.0.0.1:')[1].split('"')[0]
    uplink_port = free_port()
    res = gw.init("start", env={"TCPRC_OPTS": "--listen 127.0.0.1:%d" % uplink_port}, script=script)
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith("tcprc-server: started")
    # The flag wins over the file: the server listens on the TCPRC_OPTS port.
    with socket.create_connection(("127.0.0.1", uplink_port), timeout=5):
        pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(listen)), timeout=5).close()
    assert gw.init("stop", script=script).returncode == 0
    assert gw.agents() == []
