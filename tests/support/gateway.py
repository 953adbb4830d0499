"""A gateway in a temp dir for etc/init.d/tcprc and scripts/tcprc-watchdog, run for real."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import ROOT
from .net import free_port

REPO = Path(ROOT)
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
