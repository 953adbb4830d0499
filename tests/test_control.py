"""The control socket in process, then `tcprc ctl` against real agent processes."""

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from support import ROOT
from support.fresh import python_output
from support.agents import run_tcprc, tcprc_command
from support.waiting import wait_for
from tcprc.ops import control
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config
from tcprc.errors import ControlError
from tcprc.ops.control import ControlServer
from tcprc.ops.ctl import send_command
from tcprc.device.app import DeviceApp
from tcprc.server.app import ServerApp


@pytest.fixture
def served(tmp_path):
    """A DeviceApp with its parser on a control socket in this process."""
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    app.start()
    path = str(tmp_path / "run" / "tcprc.sock")     # the directory is created on start
    server = ControlServer(CommandParser(app, cfg), path)
    server.start()
    yield server
    server.close()
    app.close()


def control_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tcprc-control")]


def talk(path, data, timeout=5.0):
    """Send raw bytes, read until the agent closes or goes quiet."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_socket_is_private_and_answers(served):
    mode = os.stat(served.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    lines = send_command(served.path, "status", 5)
    assert lines[0] == "state: idle" and lines[-1] == "OK"
    assert send_command(served.path, "nonsense", 5) == [
        "ERROR unknown command 'nonsense' (type help for the list)"]
    assert not [n for n in os.listdir(os.path.dirname(served.path)) if n.endswith(".tmp")]


def test_several_commands_on_one_connection_and_blank_lines(served):
    out = talk(served.path, b"help\r\n\nstatus\nconfig get device.local\n").decode()
    answers = out.split("\n")
    assert answers.count("OK") == 3
    assert "ERROR empty command" in answers
    assert 'device.local = "127.0.0.1:23"' in answers


def test_megabyte_line_is_refused_and_memory_stays_bounded(served):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(served.path)
        try:
            sock.sendall(b"x" * (1 << 20))    # the agent hangs up long before the end
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
    assert out == b"ERROR line too long (max 4096 bytes)\n"
    assert send_command(served.path, "status", 5)[-1] == "OK"    # the agent lives on


def test_idle_connections_are_dropped(tmp_path):
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    server = ControlServer(CommandParser(app, cfg), str(tmp_path / "c.sock"), client_timeout=0.5)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(server.path)
            assert sock.recv(1) == b""        # closed by the agent, not by our timeout
    finally:
        server.close()


class Drip(threading.Thread):
    """A client sending `data` every 50 ms: until the agent hangs up, at most `life` s."""

    def __init__(self, path, data, life=15.0):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.data, self.life = data, life
        self.stop = threading.Event()
        self.cut = None          # seconds after the start when the agent hung up

    def run(self):
        started = time.monotonic()
        try:
            while not self.stop.is_set() and time.monotonic() - started < self.life:
                try:
                    self.sock.send(self.data)
                except OSError:
                    self.cut = time.monotonic() - started
                    return
                self.stop.wait(0.05)
        finally:
            self.sock.close()


@pytest.fixture
def short_timeout(tmp_path):
    """A control socket whose clients get 1 s for each command."""
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    server = ControlServer(CommandParser(app, cfg), str(tmp_path / "c.sock"), client_timeout=1.0)
    server.start()
    yield server
    server.close()


def test_slow_drip_connections_cannot_keep_the_socket_busy(short_timeout):
    """Eight clients sending a byte at a time, never a newline: the ninth gets in."""
    drips = [Drip(short_timeout.path, b"s") for _ in range(control.MAX_CLIENTS)]
    try:
        for drip in drips:
            drip.start()
        # Before the fix each byte restarted the idle clock: busy for the drips' whole life.
        wait_for(lambda: send_command(short_timeout.path, "status", 2)[-1] == "OK",
                 timeout=5, what="a ninth client answered")
        wait_for(lambda: all(d.cut is not None for d in drips), timeout=5, what="drips cut")
    finally:
        for drip in drips:
            drip.stop.set()
        for drip in drips:
            drip.join(5)


def test_blank_lines_are_no_activity_but_commands_are(short_timeout):
    blank = Drip(short_timeout.path, b"\n")
    blank.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:     # a command every 0.1 s for 2 s
            sock.settimeout(5)
            sock.connect(short_timeout.path)
            answers = b""
            for _ in range(20):
                sock.sendall(b"help\n")
                while not answers.endswith(b"OK\n"):
                    chunk = sock.recv(65536)
                    assert chunk, "the agent hung up on a client that sends commands"
                    answers += chunk
                answers = b""
                time.sleep(0.1)     # pacing the client, not synchronisation
        wait_for(lambda: blank.cut is not None, timeout=5, what="the blank-line client cut")
    finally:
        blank.stop.set()
        blank.join(5)


EPOLLS_OF_A_SERVED_SOCKET = """
import os, sys
sys.path.insert(0, "tests")
from support.procfs import descriptors_of_kind
from tcprc.device.app import DeviceApp
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config
from tcprc.ops.control import ControlServer
from tcprc.ops.ctl import send_command

def epolls():
    return descriptors_of_kind(os.getpid(), "anon_inode:[eventpoll]")

cfg = build_config("device", {}, "test")
server = ControlServer(CommandParser(DeviceApp(cfg.device), cfg), sys.argv[1])
before = epolls()
server.start()
assert send_command(sys.argv[1], "help", 5)[-1] == "OK"   # its accept loop is running
print(epolls() - before)
server.close()
"""


def test_the_control_socket_costs_no_descriptor_but_its_own(tmp_path):
    """Once the socket is there, every descriptor of the accept loop is: the agent's
    are all open when its control socket appears (a test that counts them from
    then on met an epoll that came a moment later)."""
    epolls = python_output(EPOLLS_OF_A_SERVED_SOCKET, str(tmp_path / "c.sock"))
    assert epolls.strip() == "0", "an epoll of its own while it serves"


def test_too_many_clients_are_refused_not_queued(served):
    held = []
    try:
        for _ in range(control.MAX_CLIENTS):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(served.path)
            held.append(sock)
        wait_for(lambda: len([t for t in control_threads() if t.name == "tcprc-control-client"])
                 >= control.MAX_CLIENTS, what="all clients served")
        assert send_command(served.path, "status", 5) == ["ERROR busy: too many control connections"]
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: send_command(served.path, "status", 5)[-1] == "OK", what="capacity back")


@pytest.mark.memory
def test_close_joins_threads_and_removes_the_socket(tmp_path):
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    path = str(tmp_path / "c.sock")
    server = ControlServer(CommandParser(app, cfg), path)
    server.start()
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(path)                          # a client that never speaks
    wait_for(lambda: any(t.name == "tcprc-control-client" for t in control_threads()),
             what="client thread")
    server.close()
    idle.close()
    assert not os.path.exists(path)
    assert control_threads() == []


def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path):
    path = str(tmp_path / "c.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                                # a crashed agent's leftover
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    first = ControlServer(CommandParser(app, cfg), path)
    first.start()
    try:
        assert send_command(path, "status", 5)[-1] == "OK"
        second = ControlServer(CommandParser(app, cfg), path)
        with pytest.raises(ControlError, match="in use by another running agent"):
            second.start()
        assert send_command(path, "status", 5)[-1] == "OK"   # the first still owns it
    finally:
        first.close()


def test_a_regular_file_is_never_replaced(tmp_path):
    path = tmp_path / "c.sock"
    path.write_text("precious")
    cfg = build_config("device", {}, "test")
    server = ControlServer(CommandParser(DeviceApp(cfg.device), cfg), str(path))
    with pytest.raises(ControlError, match="not a socket"):
        server.start()
    assert path.read_text() == "precious"


def test_close_leaves_a_successors_socket_alone(tmp_path):
    path = str(tmp_path / "c.sock")
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    old = ControlServer(CommandParser(app, cfg), path)
    old.start()
    os.unlink(path)                             # the operator removed it; a new agent took the path
    new = ControlServer(CommandParser(app, cfg), path)
    new.start()
    old.close()
    assert send_command(path, "status", 5)[-1] == "OK"
    new.close()
    assert not os.path.exists(path)


def test_path_too_long_is_a_clear_error(tmp_path):
    cfg = build_config("device", {}, "test")
    server = ControlServer(CommandParser(DeviceApp(cfg.device), cfg), "/tmp/" + "x" * 120)
    with pytest.raises(ControlError, match="too long"):
        server.start()


# -- real processes ----------------------------------------------------------

class Agent:
    """`tcprc device|server -c FILE` as a process, stopped with SIGTERM."""

    def __init__(self, role, config_path, socket_path, env=None):
        self.socket_path = socket_path
        self.config_path = config_path
        self.log_path = config_path + ".%d.log" % id(self)
        with open(self.log_path, "wb") as log:   # a file: a chatty agent never blocks on a pipe
            self.proc = subprocess.Popen(tcprc_command(role, "-c", config_path), cwd=ROOT,
                                         env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.result = None
        wait_for(lambda: self._answers() or self.proc.poll() is not None,
                 what="the agent's control socket")
        assert self.proc.poll() is None, self.stop()

    def _answers(self):
        try:
            return send_command(self.socket_path, "help", 2)[-1] == "OK"
        except OSError:
            return False

    def ctl(self, *words, role="device"):
        return run_tcprc("ctl", "--role", role, "-c", self.config_path, *words)

    def stop(self):
        """SIGTERM, wait; (exit status, everything it logged)."""
        if self.result is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            with open(self.log_path) as log:
                self.result = (self.proc.returncode, log.read())
        return self.result


@pytest.fixture
def agents():
    started = []

    def start(role, tmp_path, body, env=None):
        sock = str(tmp_path / ("%s.sock" % role))
        path = tmp_path / ("%s.toml" % role)
        if not path.exists():
            path.write_text('[control]\nsocket = "%s"\n%s' % (sock, body))
        agent = Agent(role, str(path), sock, env)
        started.append(agent)
        return agent
    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def tunnel_server():
    cfg = build_config("server", {"server": {"listen": "127.0.0.1:0", "host": "127.0.0.1:0"}}, "t")
    server = ServerApp(cfg.server)
    server.start()
    yield server
    server.close()


@pytest.mark.e2e
def test_ctl_against_an_idle_device_then_a_real_tunnel(agents, tmp_path, tunnel_server, service):
    agent = agents("device", tmp_path, "")       # no server, no autostart: waits idle
    result = agent.ctl("status")
    assert result.returncode == 0 and result.stdout.startswith("state: idle\n")
    assert result.stdout.endswith("OK\n")

    result = agent.ctl("TCPRemoteConnect", "")
    assert result.returncode == 1 and result.stdout.startswith("ERROR no server")

    result = agent.ctl("TCPRemoteConnect", "127.0.0.1", str(tunnel_server.listen_address[1]),
                       "127.0.0.1", str(service.address[1]))
    assert (result.returncode, result.stdout) == (0, "OK\n")
    wait_for(lambda: tunnel_server.host_address, what="the device's LISTEN")
    with socket.create_connection(tunnel_server.host_address, timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
    assert "state: up" in agent.ctl("status").stdout

    result = agent.ctl("tcpremotedisconnect")
    assert result.returncode == 0
    wait_for(lambda: tunnel_server.host_address is None, what="tunnel closed")


@pytest.mark.e2e
def test_ctl_exit_status_and_output(agents, tmp_path):
    agent = agents("device", tmp_path, "")
    bad = agent.ctl("TCPRemoteConnect", "127.0.0.1", "99999", "127.0.0.1", "22")
    assert bad.returncode == 1 and bad.stdout.startswith("ERROR ServerPort")
    assert bad.stdout.count("\n") == 1
    spaced = agent.ctl("config", "set", "console.prompt", "gw 17> ")
    assert spaced.returncode == 0
    assert agent.ctl("config", "get", "console.prompt").stdout == 'console.prompt = "gw 17> "\nOK\n'

    gone = run_tcprc("ctl", "--socket", str(tmp_path / "nobody.sock"), "status")
    assert gone.returncode == 2 and gone.stdout == ""
    assert "no agent answers" in gone.stderr and gone.stderr.count("\n") == 1

    code, err = agent.stop()
    assert code == 0 and "Traceback" not in err
    assert not os.path.exists(agent.socket_path)     # removed on the way out
    after = agent.ctl("status")
    assert after.returncode == 2 and "no agent answers" in after.stderr


@pytest.mark.e2e
def test_ctl_with_a_broken_config_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[control\n")
    result = run_tcprc("ctl", "-c", str(path), "status")
    assert result.returncode == 2 and "invalid TOML" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_config_save_survives_a_restart(agents, tmp_path):
    agent = agents("device", tmp_path, "# the gateway in hall 3\n[device]\nautostart = false\n")
    assert agent.ctl("config", "set", "device.server", "192.0.2.7:9100").returncode == 0
    assert agent.ctl("config", "set", "device.allow", "127.0.0.1:80,127.0.0.1:502").returncode == 0
    assert agent.ctl("config", "set", "device.keepalive_idle", "45").returncode == 0
    saved = agent.ctl("config", "save")
    assert saved.returncode == 0, saved.stdout
    assert agent.stop()[0] == 0

    text = (tmp_path / "device.toml").read_text()
    assert "# the gateway in hall 3" in text
    agent = agents("device", tmp_path, "")              # same file, new process
    out = agent.ctl("config", "get", "device").stdout
    assert 'device.server = "192.0.2.7:9100"' in out
    assert 'device.allow = ["127.0.0.1:80", "127.0.0.1:502"]' in out
    assert "device.keepalive_idle = 45" in out and "device.autostart = false" in out
    assert agent.ctl("status").stdout.startswith("state: idle")   # autostart stayed off


KILLED_SAVE = """
import os, signal, sys
from tcprc.ops import tomlwrite
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)   # die mid-save, file written
tomlwrite.atomic_write(sys.argv[1], "[device]\\nautostart = false\\n")
"""


@pytest.mark.e2e
def test_stale_save_temp_files_are_removed_at_start(agents, tmp_path):
    config = tmp_path / "device.toml"
    config.write_text('[control]\nsocket = "%s"\n' % (tmp_path / "device.sock"))
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(config)], cwd=ROOT, timeout=30)
    assert killed.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".device.toml."), left
    hour_ago = time.time() - 3600
    planted = {".device.toml.abc_1234.tmp": hour_ago,
               ".device.toml.zzzzzzzz.tmp": time.time() + 86400}   # the clock was set back
    keep = {".device.toml.fresh000.tmp": None,                     # maybe a save under way
            ".device.toml.abcd1234.tmp.bak": hour_ago, ".device.toml.abc1234.tmp": hour_ago,
            "device.toml.abcd1234.tmp": hour_ago, ".other.toml.abcd1234.tmp": hour_ago,
            ".device.toml.ABCD1234.tmp": hour_ago}
    for name, mtime in list(planted.items()) + list(keep.items()):
        (tmp_path / name).write_text("x")
        if mtime is not None:
            os.utime(str(tmp_path / name), (mtime, mtime))
    os.utime(str(tmp_path / left[0]), (hour_ago, hour_ago))
    os.mkdir(str(tmp_path / ".device.toml.dir00000.tmp"))
    os.symlink(str(tmp_path / "device.toml.abcd1234.tmp"), str(tmp_path / ".device.toml.link0000.tmp"))
    os.utime(str(tmp_path / ".device.toml.link0000.tmp"), (hour_ago, hour_ago),
             follow_symlinks=False)
    keep.update({".device.toml.dir00000.tmp": None, ".device.toml.link0000.tmp": None})

    agent = agents("device", tmp_path, "")
    names = set(os.listdir(str(tmp_path)))
    assert not names & (set(planted) | {left[0]}), sorted(names)
    assert set(keep) <= names, sorted(names)
    assert config.read_text().startswith("[control]")          # the config itself untouched
    assert agent.ctl("status").returncode == 0
    status, log = agent.stop()
    assert status == 0
    lines = [line for line in log.splitlines() if "stale temporary" in line]
    assert len(lines) == 1 and "removed 3 " in lines[0], log


@pytest.mark.e2e
def test_ctl_on_the_server_role(agents, tmp_path):
    agent = agents("server", tmp_path, '[server]\nlisten = "127.0.0.1:0"\nhost = "127.0.0.1:0"\n')
    result = agent.ctl("status", role="server")
    assert result.returncode == 0 and result.stdout.startswith("state: waiting\n")
    assert "listen: 127.0.0.1:" in result.stdout
    result = agent.ctl("TCPRemoteConnect", role="server")
    assert result.returncode == 1
    assert result.stdout == "ERROR TCPRemoteConnect is not available on the server\n"
    help_text = agent.ctl("help", role="server").stdout
    assert "status" in help_text and "TCPRemoteConnect" not in help_text
    assert agent.ctl("config", "get", "server.takeover", role="server").stdout == \
        "server.takeover = true\nOK\n"
    assert agent.ctl("config", "set", "server.takeover", "false", role="server").returncode == 0
    assert agent.ctl("config", "get", "server.takeover", role="server").stdout == \
        "server.takeover = false\nOK\n"


def without_pyserial(tmp_path):
    """An environment whose `import serial` fails, as on a gateway without pyserial."""
    blocker = tmp_path / "noserial" / "serial"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pyserial is not installed')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]))


@pytest.mark.e2e
def test_console_flag_without_pyserial_says_how_to_install(tmp_path):
    env = without_pyserial(tmp_path)
    result = run_tcprc("device", "--console", "/dev/ttyS0", env=env)
    assert result.returncode == 2
    assert result.stderr == "tcprc: --console: the serial console needs pyserial: " \
                            "pip install 'tcprc[serial]'\n"


@pytest.mark.e2e
def test_console_port_in_config_without_pyserial_keeps_the_agent_running(agents, tmp_path):
    agent = agents("device", tmp_path, '[console]\nport = "/dev/ttyS0"\n',
                   env=without_pyserial(tmp_path))
    assert agent.ctl("status").returncode == 0       # everything else works
    code, err = agent.stop()
    assert code == 0 and "pip install 'tcprc[serial]'" in err


@pytest.mark.e2e
def test_python38_compatible_imports():
    py38 = "/root/.pyenv/versions/3.8.18/bin/python3.8"
    if not os.path.exists(py38):
        pytest.skip("no Python 3.8 on this machine")
    result = subprocess.run([py38, "-c", "import tcprc.ops.commands, tcprc.ops.console, tcprc.ops.control, "
                             "tcprc.ops.tomlwrite, tcprc.ops.ctl, tcprc.ops.channels, "
                             "tcprc.ops.service, tcprc.settings, tcprc.cli"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    if "No module named 'tomli'" in result.stderr:
        pytest.skip("Python 3.8 here lacks tomli")
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
def test_ctl_gives_up_on_an_agent_that_never_answers(tmp_path):
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(path)
    mute.listen(1)                       # accepts (in the backlog), never answers
    try:
        result = run_tcprc("ctl", "--socket", path, "--timeout", "0.5", "status")
        assert result.returncode == 2
        assert result.stderr == "tcprc ctl: no answer from the agent on %s within 0.5s\n" % path
    finally:
        mute.close()
    bad = run_tcprc("ctl", "--socket", path, "--timeout", "0", "status")
    assert bad.returncode == 2 and "--timeout" in bad.stderr


@pytest.mark.e2e
def test_sighup_reload_is_what_config_get_shows(agents, tmp_path):
    agent = agents("device", tmp_path, "[device]\nautostart = false\nkeepalive_idle = 30\n")
    assert agent.ctl("config", "set", "device.keepalive_idle", "99").returncode == 0
    path = tmp_path / "device.toml"
    path.write_text(path.read_text().replace("keepalive_idle = 30", "keepalive_idle = 77"))
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.ctl("config", "get", "device.keepalive_idle").stdout
             == "device.keepalive_idle = 77\nOK\n", what="the reloaded value")
    # The unsaved `config set` was dropped with the old config: saving now keeps 77.
    assert agent.ctl("config", "save").returncode == 0
    assert "keepalive_idle = 77" in path.read_text()


def test_a_client_with_a_command_every_moment_still_ends_at_the_maximum_life(tmp_path):
    """One full line every few seconds used to hold a slot for ever; now a connection
    ends after max_life, with a line that says so."""
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    server = ControlServer(CommandParser(app, cfg), str(tmp_path / "c.sock"), client_timeout=1.0,
                           max_life=1.5)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(server.path)
            started, answers = time.monotonic(), b""
            while time.monotonic() - started < 10:
                try:
                    sock.sendall(b"help\n")
                except OSError:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answers += chunk
                time.sleep(0.2)     # pacing the client: a command every 0.2 s
            try:
                while True:          # what the agent said before it hung up
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answers += chunk
            except OSError:
                pass
            assert time.monotonic() - started < 5, "the connection outlived its maximum life"
            assert b"ERROR connection closed: open for 1.5s" in answers
    finally:
        server.close()


def test_a_control_connection_whose_thread_cannot_start_is_refused_and_the_next_served(
        served, monkeypatch):
    real_start = threading.Thread.start
    failing = {"on": True}

    def start(thread):
        if failing["on"] and thread.name == "tcprc-control-client":
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    assert send_command(served.path, "status", 5) == [
        "ERROR busy: the agent cannot start a thread for this connection"]
    failing["on"] = False
    assert send_command(served.path, "status", 5)[-1] == "OK"   # the acceptor lives on
