"""etc/init.d/tcprc, run for real under dash and busybox ash, with and without
start-stop-daemon (Debian's and busybox's), in a temporary directory.

The Gateway helper here is shared with test_watchdog.py.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
INIT = REPO / "etc" / "init.d" / "tcprc"
WATCHDOG = REPO / "scripts" / "tcprc-watchdog"
DEBIAN_SSD = shutil.which("start-stop-daemon", path="/usr/sbin:/sbin:/usr/bin:/bin")
BUSYBOX = shutil.which("busybox")

SHELLS = {"dash": ["dash"], "busybox-ash": ["busybox", "ash"]}


def shell_argv(name):
    argv = SHELLS[name]
    if shutil.which(argv[0]) is None:
        pytest.skip("%s is not installed (apt-get install -y %s)" % (argv[0], argv[0]))
    return argv


def alive(pid):
    """True for a running process; a zombie (nobody reaps in here) is dead."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Gateway:
    """A gateway in a temp dir: config, pidfile, lock, a `tcprc` on PATH.

    TCPRC_DAEMON/CONF/PIDFILE come from the defaults file (as on a gateway),
    the rest from the environment.
    """

    def __init__(self, tmp_path, ssd="debian", role="device"):
        self.dir = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.run = tmp_path / "run"   # created by the init script
        self.conf = tmp_path / ("%s.toml" % role)
        self.log = tmp_path / "agent.log"
        self.pidfile = self.run / "tcprc.pid"
        self.ctl_socket = tmp_path / "ctl.sock"
        self.ssd_log = tmp_path / "ssd.log"
        self.role = role
        self.write_config()
        self.daemon = self._script("tcprc", 'exec "%s" -m tcprc "$@"' % sys.executable)
        path = [str(self.bin), os.path.dirname(sys.executable)]
        if ssd == "debian":
            if DEBIAN_SSD is None:
                pytest.skip("Debian's start-stop-daemon is not installed")
            self._script("start-stop-daemon", 'echo "$*" >> "%s"\nexec "%s" "$@"' % (self.ssd_log, DEBIAN_SSD))
        elif ssd == "busybox":
            if BUSYBOX is None:
                pytest.skip("busybox is not installed (apt-get install -y busybox)")
            self._script("start-stop-daemon", 'echo "$*" >> "%s"\nexec "%s" start-stop-daemon "$@"'
                         % (self.ssd_log, BUSYBOX))
        # /usr/sbin and /sbin hold Debian's start-stop-daemon: leave them out.
        path += ["/usr/local/bin", "/usr/bin", "/bin"]
        self.defaults = tmp_path / "default-tcprc"
        self.defaults.write_text("TCPRC_DAEMON=%s\nTCPRC_CONF=%s\nTCPRC_PIDFILE=%s\n"
                                 % (self.daemon, self.conf, self.pidfile))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TCPRC_")}
        self.env.update(PATH=":".join(path), PYTHONPATH=str(REPO), TCPRC_DEFAULTS=str(self.defaults),
                        TCPRC_ROLE=role, TCPRC_INIT=str(INIT), TCPRC_LOCK=str(self.run / "wd.lock"),
                        TCPRC_CTL_TIMEOUT="1", TCPRC_STOP_TIMEOUT="3")

    def _script(self, name, body):
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        return path

    def write_config(self, level="info", extra=""):
        if self.role == "device":
            head = '[device]\nserver = ""\n'
        else:
            head = '[server]\nlisten = "127.0.0.1:%d"\nhost = "127.0.0.1:%d"\n' % (free_port(), free_port())
        self.conf.write_text(head + extra + '[control]\nsocket = "%s"\n[log]\nlevel = "%s"\ntarget = "%s"\n'
                             % (self.ctl_socket, level, self.log))

    def init(self, action, shell="dash", env=None, timeout=30, script=INIT):
        argv = shell_argv(shell) + [str(script), action]
        return subprocess.run(argv, env=dict(self.env, **(env or {})), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)

    def watchdog(self, shell="dash", env=None, timeout=30):
        return subprocess.run(shell_argv(shell) + [str(WATCHDOG)], env=dict(self.env, **(env or {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout)

    def pid(self):
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def agents(self):
        """Live processes running this gateway's config."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if str(self.conf).encode() in cmdline and b" ctl " not in cmdline.replace(b"\0", b" ") \
                    and alive(int(entry)):
                found.append(int(entry))
        return found

    def log_text(self):
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def cleanup(self):
        for pid in self.agents():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit,role", [("tcprc.service", "device"), ("tcprc-server.service", "server")])
def test_systemd_units_verify(tmp_path, unit, role):
    text = (REPO / "etc" / "systemd" / unit).read_text()
    lines = text.splitlines()
    assert "Restart=on-failure" in lines and "NoNewPrivileges=yes" in lines
    assert "ProtectSystem=strict" in lines and "ExecReload=/bin/kill -HUP $MAINPID" in lines
    start = [l for l in lines if l.startswith("ExecStart=")]
    assert start == ["ExecStart=/usr/bin/tcprc %s -c ${TCPRC_CONF} $TCPRC_OPTS" % role]   # foreground
    # verify wants an existing ExecStart binary: point it at this Python.
    (tmp_path / unit).write_text(text.replace("/usr/bin/tcprc", sys.executable))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "", res.stdout
