"""tcprc as real processes: the command line, one-shot runs, long-running agents."""

import os
import subprocess
import sys
from typing import Any, List

from . import ROOT
from .net import free_port, listening
from .waiting import wait_for


def tcprc_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "tcprc"] + list(args)


def run_tcprc(*args: str, timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(tcprc_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


class Agents:
    """tcprc processes started by a test, stopped (and checked) at its end."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []

    def start(self, role, *args, config="", env=None, prefix=()):
        """Start `tcprc ROLE`; its log goes to a file (a full pipe would block it).
        `prefix`: argv in front, e.g. `ip netns exec NS` (support.netns)."""
        n = len(self.procs)
        path = self.tmp / ("%s-%d.toml" % (role, n))
        sock = self.tmp / ("%s-%d.sock" % (role, n))
        path.write_text("[control]\nsocket = \"%s\"\n%s" % (sock, config))
        log = open(str(self.tmp / ("%s-%d.log" % (role, n))), "w+")
        proc = subprocess.Popen(list(prefix) + tcprc_command(role, "-c", str(path), *args), cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))
        proc.log_file = log
        proc.control_socket = str(sock)
        self.procs.append(proc)
        return proc

    @staticmethod
    def log(proc) -> str:
        with open(proc.log_file.name) as handle:
            return handle.read()

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.log_file.close()


def start_tunnel(agents, target, device_env=None, device_args=()):
    listen, host = free_port(), free_port()
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % host)
    wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen, "--local", "%s:%d" % target,
                          *device_args, env=device_env)
    wait_for(lambda: listening(host) or device.poll() is not None, what="host port")
    assert server.poll() is None and device.poll() is None
    return server, device, ("127.0.0.1", host)
