"""The four ways from a client to the service: direct, socat, ssh -R, tcprc."""

import getpass
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional

from .base import LOCAL, REPO, BenchError, Procs, free_port, listening, note, read_line, wait_for
from .install import InstallError, compile_modules, make_venv
from .procfs import sample

# "tcprc" is what two tcprc ends negotiate by default (protocol v2);
# "tcprc-legacy" is the device with --protocol legacy; "tcprc-tls" is v2 over
# TLS with certificates from scripts/tcprc-pki.
VARIANTS = ("direct", "socat", "ssh", "tcprc-legacy", "tcprc", "tcprc-tls")
# Only on request (--only): tcprc with its opt-in zero-copy pumps (TCPRC_SPLICE=1).
EXTRA = ("tcprc-splice", "baseline")
LABELS = {"direct": "direct", "socat": "socat relay", "ssh": "ssh -R", "tcprc": "tcprc v2",
          "tcprc-legacy": "tcprc legacy", "tcprc-tls": "tcprc TLS",
          "tcprc-splice": "tcprc, splice", "baseline": "tcprc baseline"}


class Tunnel:
    def __init__(self, entry: int, device: Optional[int] = None,
                 server: Optional[int] = None, close: Callable[[], None] = lambda: None,
                 log: str = "", uplink: int = 0, device_err: str = ""):
        self.entry = entry
        self.device = device     # pid of the process next to the service
        self.server = server     # pid of the process clients connect to
        self.close = close
        self.log = log           # the relay's log file, quoted when a test fails
        self.uplink = uplink     # tcprc: the server's uplink port
        self.device_err = device_err   # tcprc: the device's stderr

    def log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.log) as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return ""
        return "".join("\n    " + line for line in tail)


def _wait_entry(port: int, procs: List[subprocess.Popen], what: str, timeout: float = 15) -> None:
    def ready() -> bool:
        for proc in procs:
            if proc.poll() is not None:
                raise BenchError("%s exited with status %d" % (what, proc.returncode))
        return listening(port)
    wait_for(ready, timeout, "%s to accept on port %d" % (what, port))


class Direct:
    name = "direct"

    def missing(self) -> Optional[str]:
        return None

    def open(self, procs: Procs, target: int) -> Tunnel:
        return Tunnel(target)

    def close(self) -> None:
        pass


class Socat:
    name = "socat"

    def missing(self) -> Optional[str]:
        return None if shutil.which("socat") else "socat is not installed"

    def open(self, procs: Procs, target: int) -> Tunnel:
        entry = free_port()
        proc = procs.start(["socat", "TCP-LISTEN:%d,bind=%s,reuseaddr,fork,backlog=512" % (entry, LOCAL),
                            "TCP:%s:%d" % (LOCAL, target)])
        _wait_entry(entry, [proc], "socat")
        return Tunnel(entry, device=proc.pid, server=proc.pid, close=lambda: procs.stop(proc))

    def close(self) -> None:
        pass


class SshR:
    """A private sshd on 127.0.0.1 (own host key, one authorized key) and `ssh -N -R`."""
    name = "ssh"

    def __init__(self) -> None:
        self.dir: Optional[str] = None
        self.sshd: Optional[subprocess.Popen] = None
        self.port = 0

    def missing(self) -> Optional[str]:
        for tool in ("ssh", "ssh-keygen"):
            if not shutil.which(tool):
                return "%s is not installed" % tool
        if not self._sshd_path():
            return "sshd (openssh-server) is not installed"
        return None

    @staticmethod
    def _sshd_path() -> Optional[str]:
        found = shutil.which("sshd")
        for path in ([found] if found else []) + ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]:
            if path and os.access(path, os.X_OK):
                return os.path.abspath(path)   # sshd re-execs itself: needs an absolute path
        return None

    def _start_sshd(self, procs: Procs) -> None:
        self.dir = tempfile.mkdtemp(prefix="tcprc-bench-ssh-")
        d = self.dir
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)],
                           check=True, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.copy(os.path.join(d, "user_key.pub"), os.path.join(d, "authorized_keys"))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)   # privilege separation directory
        self.port = free_port()
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "Port %d" % self.port, "ListenAddress %s" % LOCAL,
                "HostKey %s" % os.path.join(d, "host_key"),
                "AuthorizedKeysFile %s" % os.path.join(d, "authorized_keys"),
                "PidFile none", "UsePAM no", "StrictModes no",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes", "GatewayPorts no", "LogLevel ERROR", "",
            ]))
        self.sshd = procs.start([self._sshd_path(), "-D", "-e", "-f", config])
        _wait_entry(self.port, [self.sshd], "sshd")

    def open(self, procs: Procs, target: int) -> Tunnel:
        if self.sshd is None:
            self._start_sshd(procs)
        entry = free_port()
        err = open(os.path.join(self.dir, "ssh-%d.err" % entry), "w+")
        proc = procs.start([
            "ssh", "-F", "/dev/null", "-i", os.path.join(self.dir, "user_key"), "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            "-N", "-R", "%s:%d:%s:%d" % (LOCAL, entry, LOCAL, target),
            "%s@%s" % (getpass.getuser(), LOCAL)], stderr=err)
        try:
            _wait_entry(entry, [proc], "ssh -R")
        except BenchError as exc:
            err.seek(0)
            raise BenchError("%s: %s" % (exc, err.read().strip()[-300:]))
        finally:
            err.close()
        return Tunnel(entry, device=proc.pid, server=self.sshd.pid, close=lambda: procs.stop(proc))

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# How each install starts tcprc (the venv's `tcprc` command, or `python -m tcprc`),
# plus a SIGUSR1 handler that writes pymalloc's statistics to stderr: how
# `--breakdown` learns the size of the Python heap.
MALLOCSTATS_MAIN = {
    "venv": ("import re, signal, sys\n"
             "signal.signal(signal.SIGUSR1, lambda *_: sys._debugmallocstats())\n"
             "from tcprc.cli import main\n"
             "sys.argv[0] = 'tcprc'\n"
             "sys.exit(main())\n"),
    "pythonpath": ("import runpy, signal, sys\n"
                   "signal.signal(signal.SIGUSR1, lambda *_: sys._debugmallocstats())\n"
                   "sys.argv[0] = 'tcprc'\n"
                   "runpy.run_module('tcprc', run_name='__main__', alter_sys=True)\n"),
}
STALL_TIMEOUT = 2.0
BENCH_SECRET = "bench-secret-not-for-use-outside-the-bench"
PKI = os.path.join(REPO, "scripts", "tcprc-pki")


class Tcprc:
    """`tcprc server` + `tcprc device` from this checkout.

    `install`: "venv" runs them as README's install does (a venv of their own
    and its `tcprc` command), "pythonpath" as `python -m tcprc` with the
    checkout on PYTHONPATH (see install.py).  `device_args` go to the device's
    command line (say, --protocol legacy); `tls` serves and dials the uplink
    over TLS, with a CA and a server certificate made by scripts/tcprc-pki
    (the device checks both).
    """
    name = "tcprc"
    paused_row = True

    def __init__(self, python: str = sys.executable, extra_env: Optional[Dict[str, str]] = None,
                 repo: str = REPO, device_args: Optional[List[str]] = None, tls: bool = False,
                 install: str = "venv"):
        self.dir: Optional[str] = None
        self.python = python
        self.repo = repo
        self.device_args = list(device_args or [])
        self.tls = tls
        self.tls_ca = ""   # set once the PKI is made: the TLS handshake row needs it
        self.install = install
        self.command = [python, "-m", "tcprc"]   # the venv's `tcprc` once it is made
        self.venv = ""
        self.env = dict(os.environ)
        if install == "pythonpath":
            self.env["PYTHONPATH"] = repo + os.pathsep + self.env.get("PYTHONPATH", "")
        # As deployed: etc/init.d/tcprc and the systemd units set these.
        # PYTHONOPTIMIZE (README: "Smaller still") passes through from the
        # bench's environment; the modules are compiled at its level.
        self.env.setdefault("MALLOC_ARENA_MAX", "1")
        self.env.setdefault("GLIBC_TUNABLES", "glibc.pthread.stack_cache_size=0")
        self.env.update(extra_env or {})

    def interpreter_rss_kb(self) -> float:
        """RSS of this Python alone, same environment, doing nothing: what tcprc builds on.

        The idle device's RSS minus this is tcprc's own cost; the rest is the
        interpreter and whatever its site-packages run at start-up.
        """
        proc = subprocess.Popen([self.interpreter(), "-c", "import sys, time\nprint(1, flush=True)\ntime.sleep(60)"],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            read_line(proc, 30)
            return sample(proc.pid)["rss_kb"]
        finally:
            proc.kill()
            proc.wait(10)

    def interpreter(self) -> str:
        """The python that runs tcprc: the venv's, or the base one."""
        return os.path.join(self.venv, "bin", "python") if self.venv else self.python

    def missing(self) -> Optional[str]:
        if self.install == "venv" and not self.venv:
            self.dir = self.dir or tempfile.mkdtemp(prefix="tcprc-bench-")
            try:
                self.command = [make_venv(self.python, self.repo, os.path.join(self.dir, "venv"))]
                self.venv = os.path.join(self.dir, "venv")
            except (InstallError, OSError, subprocess.SubprocessError) as exc:
                return "cannot make a venv with %s: %s" % (self.python, exc)
        # As deployed: the install byte-compiles what it installs.  A checkout
        # run with PYTHONDONTWRITEBYTECODE set would otherwise compile every
        # module at each start, which costs time and about 1 MB of the RSS
        # measured.  (__pycache__ is ignored by git.)
        # Run where no tcprc is (`-c` puts the working directory first on sys.path).
        self.dir = self.dir or tempfile.mkdtemp(prefix="tcprc-bench-")
        found = subprocess.run([self.interpreter(), "-c", "import os, tcprc.cli, tcprc.device, tcprc.server\n"
                                "try:\n import tomli as t\nexcept ImportError:\n import tomllib as t\n"
                                "print(os.path.dirname(tcprc.__file__)); print(os.path.dirname(t.__file__))"],
                               env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30,
                               cwd=self.dir)
        dirs = found.stdout.decode().split()
        if found.returncode != 0:
            return "the tcprc package does not import from %s with %s" % (self.repo, self.python)
        if os.path.realpath(dirs[0]) != os.path.realpath(os.path.join(self.repo, "tcprc")):
            return "tcprc imports from %s, not from %s" % (dirs[0], self.repo)
        if not compile_modules(self.interpreter(), dirs[:1] + [d for d in dirs[1:] if "site-packages" in d],
                               self.env):
            note("could not byte-compile %s: tcprc compiles its modules at each start" % self.repo)
        return self._make_pki() if self.tls else None

    def _make_pki(self) -> Optional[str]:
        """A CA and a server certificate for 127.0.0.1 ("localhost"), or why not."""
        if not shutil.which("openssl"):
            return "the openssl command is not installed (scripts/tcprc-pki needs it)"
        self.dir = self.dir or tempfile.mkdtemp(prefix="tcprc-bench-")
        ca = os.path.join(self.dir, "pki")
        for args in (["ca", ca], ["server", ca, "localhost", "--ip", LOCAL]):
            made = subprocess.run(["sh", PKI] + args, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=60)
            if made.returncode != 0:
                return "scripts/tcprc-pki %s failed: %s" % (args[0], made.stderr.decode().strip()[-200:])
        self.tls_ca = os.path.join(ca, "ca.crt")
        self.tls_cert = os.path.join(ca, "localhost.crt")
        self.tls_key = os.path.join(ca, "localhost.key")
        return None

    def open(self, procs: Procs, target: int, identity: bool = False, mallocstats: bool = False) -> Tunnel:
        """A server and a device carrying clients of the returned entry to `target`;
        `identity`: the device proves an id with a secret, as a fleet deploys it;
        `mallocstats`: the device writes pymalloc's statistics to `Tunnel.device_err`
        on SIGUSR1 (MALLOCSTATS_MAIN)."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="tcprc-bench-")
        listen, host = free_port(), free_port()
        shared_host = free_port() if identity else host   # the device's own port is `host`
        paths = {}
        for role in ("server", "device"):
            paths[role] = os.path.join(self.dir, "%s-%d.toml" % (role, host))
            with open(paths[role], "w") as f:
                # As deployed, with a control socket (in our temp dir, not /run).
                f.write('[control]\nsocket = "%s"\n' % os.path.join(self.dir, "%s-%d.sock" % (role, host)))
                # iperf3 stops reading its data connection at the end of a test
                # and waits for the results on its control connection, which
                # the legacy protocol (no per-stream flow control) carries
                # behind that unread data: the tunnel stalls until the stalled
                # stream is cut (stall_timeout, 30 s by default; iperf3 gives
                # up before that).  Only the end of a test waits these 2 s.
                f.write('[%s]\nstall_timeout = %s\n' % (role, STALL_TIMEOUT))
                if self.tls and role == "server":
                    f.write('tls_cert = "%s"\ntls_key = "%s"\n' % (self.tls_cert, self.tls_key))
                elif self.tls:
                    f.write('tls = true\ntls_ca = "%s"\ntls_server_name = "localhost"\n' % self.tls_ca)
                if identity and role == "device":
                    f.write('id = "bench"\nsecret = "%s"\n' % BENCH_SECRET)
                elif identity:
                    f.write('[server.devices.bench]\nsecret = "%s"\nhost = "%s:%d"\n'
                            % (BENCH_SECRET, LOCAL, host))
        log = open(os.path.join(self.dir, "tcprc-%d.log" % host), "w+")
        cwd = self.repo if self.install == "pythonpath" else self.dir   # `-c`: sys.path[0] is cwd
        server = procs.start(self.command + ["server", "-c", paths["server"],
                              "--listen", "%s:%d" % (LOCAL, listen), "--host", "%s:%d" % (LOCAL, shared_host)],
                             env=self.env, stderr=log, cwd=cwd)
        device = None
        main = [self.interpreter(), "-c", MALLOCSTATS_MAIN[self.install]] if mallocstats else self.command
        device_err = os.path.join(self.dir, "device-%d.err" % host) if mallocstats else log.name
        try:
            _wait_entry(listen, [server], "tcprc server")
            err = open(device_err, "w") if mallocstats else log
            device = procs.start(main + ["device", "-c", paths["device"],
                                  "--server", "%s:%d" % (LOCAL, listen),
                                  "--local", "%s:%d" % (LOCAL, target)] + self.device_args,
                                 env=self.env, stderr=err, cwd=cwd)
            if mallocstats:
                err.close()
            _wait_entry(host, [server, device], "tcprc device")
        except BenchError as exc:
            log.seek(0)
            raise BenchError("%s: %s" % (exc, log.read().strip()[-300:]))
        finally:
            log.close()

        def close() -> None:
            procs.stop(device)
            procs.stop(server)
        return Tunnel(host, device=device.pid, server=server.pid, close=close, log=log.name,
                      uplink=listen, device_err=device_err)

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
