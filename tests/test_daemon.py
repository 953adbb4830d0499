"""tcprc/ops/{pidfile,logsetup,detach,signals,service}.py: pidfile, syslog
handler, logging targets, and the real
`tcprc device|server --daemon --pidfile` with signals against a peer that
speaks the wire protocol on 127.0.0.1.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support.fresh import python_output
from support.gateway import REPO, alive
from support.net import free_port, recv_exactly
from support.services import Service
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.errors import AlreadyRunning, PidFileError
from tcprc.ops.logsetup import SyslogHandler, log_uncaught, make_handler, setup_logging
from tcprc.ops.pidfile import PidFile, read_pid


# -- PidFile, in process (flock conflicts between two opens of one process too)

def test_pidfile_locks_and_refuses_a_second_owner(tmp_path):
    path = tmp_path / "a.pid"
    first = PidFile(str(path))
    first.acquire()
    assert path.read_text() == "%d\n" % os.getpid()
    began = time.monotonic()
    with pytest.raises(AlreadyRunning) as info:
        PidFile(str(path)).acquire(patience=0.2)
    assert time.monotonic() - began < 2.0
    assert str(info.value) == "%s: already running (pid %d)" % (path, os.getpid())
    first.release()
    assert not path.exists()
    second = PidFile(str(path))
    second.acquire()
    second.release()


@pytest.mark.e2e
def test_pidfile_of_a_dead_agent_is_taken_over(tmp_path):
    path = tmp_path / "a.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text("%d\n" % dead.pid)
    pidfile = PidFile(str(path))
    pidfile.acquire()
    assert read_pid(str(path)) == os.getpid()
    assert [name for name in os.listdir(str(tmp_path))] == ["a.pid"]   # no temp file left
    pidfile.release()


def test_release_leaves_a_pidfile_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "a.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    path.unlink()
    path.write_text("12345\n")   # someone else's now
    pidfile.release()
    assert path.read_text() == "12345\n"


def test_pidfile_in_a_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(PidFileError) as info:
        PidFile(str(tmp_path / "nope" / "a.pid")).acquire()
    assert "cannot write pidfile" in str(info.value) and "\n" not in str(info.value)


# -- logging targets

def test_syslog_handler_sends_daemon_facility_with_ident(tmp_path):
    address = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(address)
        syslogd.settimeout(5)
        handler = SyslogHandler(address)
        logger = logging.getLogger("tcprc.test.syslog")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("uplink %s lost", "a:1")
            logger.error("boom")
        finally:
            logger.removeHandler(handler)
            handler.close()
        # facility daemon (3) * 8 + severity: warning 4, error 3
        assert syslogd.recv(4096) == b"<28>tcprc[%d]: uplink a:1 lost" % os.getpid()
        assert syslogd.recv(4096) == b"<27>tcprc[%d]: boom" % os.getpid()


def test_syslog_handler_without_syslogd_neither_raises_nor_blocks(tmp_path):
    handler = SyslogHandler(str(tmp_path / "nobody"))
    record = logging.LogRecord("tcprc", logging.INFO, __file__, 1, "lost", None, None)
    began = time.monotonic()
    for _ in range(100):
        handler.emit(record)
    assert time.monotonic() - began < 1.0
    handler.close()


def test_auto_target_is_syslog_detached_and_stderr_in_foreground():
    detached = make_handler("auto", detached=True)
    foreground = make_handler("auto", detached=False)
    try:
        assert isinstance(detached, SyslogHandler) and detached.address == "/dev/log"
        assert isinstance(foreground, logging.StreamHandler) and foreground.stream is sys.stderr
    finally:
        detached.close()


def test_setup_logging_file_level_and_reconfigure(tmp_path):
    logger = logging.getLogger("tcprc")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    try:
        setup_logging("info", str(first), detached=True)
        logger.debug("hidden detail")
        logging.getLogger("tcprc.device").info("uplink up")
        setup_logging("debug", str(second), detached=True)
        logger.debug("now visible")
        with pytest.raises(OSError):
            setup_logging("info", str(tmp_path / "no" / "dir.log"), detached=True)
        logger.debug("still here")   # the failed setup kept the working one
        ours = [h for h in logger.handlers if getattr(h, "_tcprc_handler", False)]
        assert len(ours) == 1
    finally:
        for handler in list(logger.handlers):
            if getattr(handler, "_tcprc_handler", False):
                logger.removeHandler(handler)
                handler.close()
        logger.handlers[:], logger.level, logger.propagate = saved
    one, two = first.read_text(), second.read_text()
    assert "uplink up" in one and "tcprc.device" in one and "hidden detail" not in one
    assert "now visible" in two and "still here" in two and "uplink up" not in two


def test_uncaught_errors_reach_the_log():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tcprc.test.crash")
    logger.addHandler(handler)
    logger.propagate = False
    saved = sys.excepthook, threading.excepthook
    try:
        log_uncaught(logger)
        worker = threading.Thread(target=lambda: 1 / 0, name="pump-7")
        worker.start()
        worker.join(5)
        try:
            raise KeyError("lost")
        except KeyError:
            sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook, threading.excepthook = saved
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["thread pump-7: unexpected error",
                                                 "unexpected error, exiting"]
    assert records[0].exc_info[0] is ZeroDivisionError and records[1].exc_info[0] is KeyError


# -- the real agent

def tcprc(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tcprc"] + list(args), env=env, cwd=kwargs.pop("cwd", None),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=30, **kwargs)


def spawn(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tcprc"] + list(args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


class Agent:
    """Config, log and pidfile of one agent in a temp dir; killed at teardown."""

    def __init__(self, tmp_path, role="device"):
        self.dir = tmp_path
        self.role = role
        self.conf = tmp_path / ("%s.toml" % role)
        self.log = tmp_path / "agent.log"
        self.pidfile = tmp_path / "agent.pid"
        self.pids = []

    def write(self, body, level="info"):
        self.conf.write_text(body + '[control]\nsocket = ""\n[log]\nlevel = "%s"\ntarget = "%s"\n'
                             % (level, self.log))

    def start(self, *extra):
        res = tcprc(self.role, "-c", self.conf.name, "--daemon", "--pidfile", self.pidfile.name,
                    *extra, cwd=str(self.dir))
        pid = read_pid(str(self.pidfile))
        if pid:
            self.pids.append(pid)
        return res

    @property
    def pid(self):
        return read_pid(str(self.pidfile))

    def log_text(self):
        return self.log.read_text() if self.log.exists() else ""

    def kill(self):
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.kill()


def proc_stat(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return handle.read().rsplit(")", 1)[1].split()


@pytest.mark.e2e
def test_daemon_detaches_and_second_instance_refuses(agent):
    agent.write('[device]\nserver = ""\n')
    res = agent.start()
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    pid = agent.pid
    assert pid and alive(pid)
    # double fork + setsid: another session, not a session leader, no tty, cwd /, stdio on /dev/null
    fields = proc_stat(pid)
    assert os.getsid(pid) not in (os.getsid(0), pid)
    assert int(fields[1]) != os.getpid()                           # ppid: not us
    assert int(fields[4]) == 0                                     # tty_nr
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    wait_for(lambda: "device agent running (pid %d, detached)" % pid in agent.log_text())

    res = agent.start()
    assert res.returncode == 1
    assert res.stderr == "tcprc: %s: already running (pid %d)\n" % (agent.pidfile, pid)
    assert agent.pid == pid and alive(pid)

    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), timeout=5.0)
    assert not agent.pidfile.exists()
    assert "signal 15: stopping" in agent.log_text()


@pytest.mark.e2e
def test_daemon_takes_over_a_stale_pidfile(agent):
    agent.write('[device]\nserver = ""\n')
    dead = subprocess.Popen(["true"])
    dead.wait()
    agent.pidfile.write_text("%d\n" % dead.pid)
    res = agent.start()
    assert res.returncode == 0, res.stderr
    assert agent.pid not in (None, dead.pid) and alive(agent.pid)


def test_daemon_start_errors_reach_the_caller(tmp_path, request):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    request.addfinalizer(busy.close)
    server = Agent(tmp_path, role="server")
    request.addfinalizer(server.kill)
    server.write('[server]\nlisten = "127.0.0.1:%d"\nhost = "127.0.0.1:%d"\n'
                 % (busy.getsockname()[1], free_port()))
    res = server.start()
    assert res.returncode == 1
    assert len(res.stderr.splitlines()) == 1 and "cannot start the server" in res.stderr, res.stderr
    assert not server.pidfile.exists()

    server.write('[server]\nlisten = "127.0.0.1:99999"\n')
    res = server.start()
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "listen" in res.stderr and "Traceback" not in res.stderr
    assert not server.pidfile.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stops_on_signal_with_exit_0(tmp_path, signum):
    conf = tmp_path / "device.toml"
    conf.write_text('[device]\nserver = ""\n[control]\nsocket = ""\n')
    pidfile = tmp_path / "fg.pid"
    proc = spawn("device", "-c", str(conf), "--pidfile", str(pidfile))
    try:
        wait_for(lambda: read_pid(str(pidfile)) == proc.pid)
        second = tcprc("device", "-c", str(conf), "--pidfile", str(pidfile))
        assert second.returncode == 1
        assert second.stderr.strip().endswith("already running (pid %d)" % proc.pid), second.stderr
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "INFO" in err   # foreground logs go to stderr
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- SIGHUP against a peer speaking the wire protocol

class Uplinks:
    """The server end, played by the test: accepts uplinks, speaks frames."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]

    def accept(self):
        sock, _ = self.listener.accept()
        sock.settimeout(10)
        assert self.read(sock) == (protocol.LISTEN, 0, b"")
        return sock

    def pending(self, wait):
        self.listener.settimeout(wait)
        try:
            sock, _ = self.listener.accept()
        except socket.timeout:
            return False
        finally:
            self.listener.settimeout(10)
        sock.close()
        return True

    @staticmethod
    def read(sock):
        head = recv_exactly(sock, protocol.HEADER_SIZE)
        length, command, client = protocol.HEADER.unpack(head)
        return command, client, recv_exactly(sock, length)

    def close(self):
        self.listener.close()


@pytest.fixture
def echo():
    svc = Service("echo")
    yield svc.address
    svc.close()


def round_trip(uplink, payload):
    uplink.sendall(protocol.encode(protocol.DATA, 1, payload))
    got = b""
    while len(got) < len(payload):
        command, client, data = Uplinks.read(uplink)
        assert (command, client) == (protocol.DATA, 1)
        got += data
    return got


WAKEUP_AFTER_START = """
import argparse, os, signal
from tcprc.ops.config import build_config
from tcprc.ops.service import Service
service = Service(argparse.Namespace(daemon=False, pidfile=None, config=None),
                  build_config("device", {}, "test"))
assert service.start()
fd = signal.set_wakeup_fd(-1)
print(os.readlink("/proc/self/fd/%d" % fd) if fd >= 0 else "none")
"""


def test_the_signal_wakeup_pipe_is_open_before_the_agent_starts_its_app():
    """Made in start(), not in wait(): every descriptor of a running agent is open once
    its ports and control socket are (a test counting them from then on met a pipe that
    came a moment later)."""
    wakeup = python_output(WAKEUP_AFTER_START)
    assert wakeup.startswith("pipe:"), wakeup


@pytest.mark.e2e
def test_sighup_reloads_keeps_streams_and_survives_a_broken_config(agent, echo):
    first, second = Uplinks(), Uplinks()
    try:
        local = "127.0.0.1:%d" % echo[1]
        agent.write('[device]\nserver = "%s"\nlocal = "%s"\n' % (first.address, local))
        assert agent.start().returncode == 0
        pid = agent.pid
        uplink = first.accept()
        uplink.sendall(protocol.encode(protocol.CONNECT, 1, protocol.encode_connect_payload(*echo)))
        assert round_trip(uplink, b"before") == b"before"

        # Same tunnel settings (only the log level differs): the stream lives on.
        agent.write('[device]\nserver = "%s"\nlocal = "%s"\n' % (first.address, local), level="debug")
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "reloaded %s" % agent.conf in agent.log_text())
        assert round_trip(uplink, b"after reload") == b"after reload"
        assert not first.pending(0.3)

        # A broken file: one line in the log, old config kept, stream alive.
        agent.conf.write_text('[device]\nserver = "%s"\nlocal = 42\n' % second.address)
        os.kill(pid, signal.SIGHUP)
        line = wait_for(lambda: [l for l in agent.log_text().splitlines() if "reload failed" in l])
        assert len(line) == 1
        assert "keeping the running config: %s: [device] local" % agent.conf in line[0]
        assert round_trip(uplink, b"still here") == b"still here"
        assert alive(pid) and not second.pending(0.3)

        # A new server address: the device moves over.
        agent.write('[device]\nserver = "%s"\nlocal = "%s"\n' % (second.address, local))
        os.kill(pid, signal.SIGHUP)
        moved = second.accept()
        moved.close()

        # SIGTERM with an open stream: gone promptly, pidfile removed.
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), timeout=5.0)   # prompt: no wait for its streams
        assert not agent.pidfile.exists()
        uplink.close()
    finally:
        first.close()
        second.close()
