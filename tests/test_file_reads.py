"""Files an operator names (config, secret_file, TLS files, devices_dir) are read
through one reader that cannot block or blow up: a FIFO, a link to a device, a
directory or an endless file is one line, never a hang (issue 19, item 4)."""

import os
import socket
import threading

import pytest

from support.agents import Agents, run_tcprc
from support.net import free_port, listening, recv_exactly
from support.waiting import wait_for
from tcprc.ops.config import ConfigError, load_config
from tcprc.ops.devdir import DeviceFiles
from tcprc.ops.files import FileProblem, check_regular_file, read_regular_file

SECRET = "correct-horse-battery-staple-42"


def private(path, text):
    """A file holding a secret: mode 0600."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return str(path)


def fifo(path):
    os.mkfifo(str(path))
    return str(path)


def in_thread(function, timeout=10):
    """function() in a thread: (returned, raised); the test fails, not hangs, if it blocks."""
    out = {}

    def run():
        try:
            out["value"] = function()
        except BaseException as exc:   # the test looks at it
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked for %s s" % timeout
    return out.get("value"), out.get("error")


# ---- the reader ------------------------------------------------------------------------

@pytest.mark.parametrize("make, problem", [
    (lambda tmp: fifo(tmp / "f"), "is a FIFO, not a regular file"),
    (lambda tmp: os.symlink(fifo(tmp / "f"), str(tmp / "l")) or str(tmp / "l"),
     "is a FIFO, not a regular file"),
    (lambda tmp: os.symlink("/dev/zero", str(tmp / "z")) or str(tmp / "z"),
     "is a character device, not a regular file"),
    (lambda tmp: str(tmp), "is a directory, not a regular file"),
    (lambda tmp: str(tmp / "missing"), "no such file"),
    (lambda tmp: os.symlink(str(tmp / "l2"), str(tmp / "l1")) or
     os.symlink(str(tmp / "l1"), str(tmp / "l2")) or str(tmp / "l1"),
     "too many levels of symbolic links"),
    (lambda tmp: private(tmp / "big", "x" * 101), "longer than 100 bytes"),
])
def test_anything_but_a_small_regular_file_is_one_line_at_once(tmp_path, make, problem):
    path = make(tmp_path)
    _, error = in_thread(lambda: read_regular_file(path, 100))
    assert isinstance(error, FileProblem) and isinstance(error, ConfigError)
    assert str(error) == "%s: %s" % (path, problem) and error.problem == problem
    if problem != "longer than 100 bytes":
        _, error = in_thread(lambda: check_regular_file(path))
        assert str(error) == "%s: %s" % (path, problem)


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    target = private(tmp_path / "real", "hello")
    os.symlink(target, str(tmp_path / "link"))
    content = read_regular_file(str(tmp_path / "link"), 5)
    assert content.data == b"hello" and content.mode & 0o777 == 0o600


def test_a_nul_byte_in_the_path_is_one_line():
    with pytest.raises(FileProblem, match="the path has a NUL byte"):
        read_regular_file("/etc/\0passwd", 10)


# ---- config, secret and TLS files of a real process -----------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("key", ["config", "secret_file", "tls_ca", "tls_cert"])
def test_a_fifo_named_anywhere_in_a_config_is_one_line_and_exit_2(tmp_path, key):
    pipe = fifo(tmp_path / "pipe")
    config = tmp_path / "device.toml"
    config.write_text('[device]\nid = "gw1"\nsecret_file = "%s"\n[control]\nsocket = ""\n'
                      % private(tmp_path / "s", SECRET))
    if key == "config":
        config = pipe
        expected = "tcprc: %s: is a FIFO, not a regular file" % pipe
    elif key == "secret_file":
        config.write_text('[device]\nid = "gw1"\nsecret_file = "%s"\n' % pipe)
        expected = "tcprc: %s: [device] secret_file %s: is a FIFO, not a regular file" % (
            config, pipe)
    else:
        other = private(tmp_path / "other.pem", "x")
        paths = {"tls_ca": ("", ""), "tls_cert": ('tls_cert = "%s"\n' % pipe,
                                                   'tls_key = "%s"\n' % other)}
        config.write_text('[device]\ntls = true\n%s%s%s' % (
            'tls_ca = "%s"\n' % pipe if key == "tls_ca" else "", *paths[key]))
        expected = "tcprc: %s: [device] %s %s: is a FIFO, not a regular file" % (config, key, pipe)
    result = run_tcprc("device", "-c", str(config), "--daemon", "--pidfile",
                       str(tmp_path / "pid"), timeout=30)
    assert result.returncode == 2 and result.stderr.splitlines() == [expected], result.stderr
    assert not os.path.exists(str(tmp_path / "pid"))


@pytest.mark.e2e
def test_a_config_linked_to_dev_zero_is_one_line(tmp_path):
    os.symlink("/dev/zero", str(tmp_path / "zero.toml"))
    result = run_tcprc("server", "-c", str(tmp_path / "zero.toml"), timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tcprc: %s: is a character device, not a regular file" % (tmp_path / "zero.toml")]


def test_an_endless_config_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "huge.toml"
    with open(str(path), "wb") as handle:
        handle.truncate(64 * 1024 * 1024)   # sparse: 64 MB of NUL bytes
    with pytest.raises(ConfigError, match=r"huge\.toml: longer than 4194304 bytes$"):
        load_config(str(path), "server")


# ---- devices_dir --------------------------------------------------------------------------

def test_the_scan_skips_a_fifo_and_a_device_link_without_blocking(tmp_path, caplog):
    folder = tmp_path / "devices"
    folder.mkdir()
    fifo(folder / "pipe.toml")
    os.symlink("/dev/zero", str(folder / "zero.toml"))
    real = private(tmp_path / "gw2-real.toml", 'host = "127.0.0.1:2302"\nsecret = "%s"\n' % SECRET)
    os.symlink(real, str(folder / "gw2.toml"))                   # a link to a file: read
    private(folder / "gw1.toml", 'host = "127.0.0.1:2301"\nsecret = "%s"\n' % SECRET)
    files = DeviceFiles(str(folder))
    found, error = in_thread(lambda: files.scan(True))
    assert error is None and sorted(found) == ["gw1", "gw2"]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert sorted(lines) == [
        "%s: is a FIFO, not a regular file; skipped" % (folder / "pipe.toml"),
        "%s: is a character device, not a regular file; skipped" % (folder / "zero.toml")]


@pytest.mark.e2e
def test_a_server_with_a_fifo_in_devices_dir_keeps_serving(tmp_path, service):
    """A real server whose devices_dir holds a FIFO and a link to /dev/zero from the
    start: it comes up, a real device gets in, and a reload still answers."""
    folder = tmp_path / "devices"
    folder.mkdir()
    fifo(folder / "pipe.toml")
    os.symlink("/dev/zero", str(folder / "zero.toml"))
    port = free_port()
    private(folder / "gw1.toml", 'host = "127.0.0.1:%d"\nsecret_file = "gw1.secret"\n' % port)
    private(folder / "gw1.secret", SECRET + "\n")
    listen = free_port()
    agents = Agents(tmp_path)
    try:
        server = agents.start("server", "--listen", "127.0.0.1:%d" % listen,
                              config='[server]\ndevices_dir = "%s"\n' % folder)
        wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
        assert server.poll() is None, agents.log(server)
        private(tmp_path / "dev.secret", SECRET)
        device = agents.start("device", "--server", "127.0.0.1:%d" % listen, "--local",
                              "%s:%d" % service.address, "--id", "gw1", "--secret-file",
                              str(tmp_path / "dev.secret"))
        wait_for(lambda: listening(port) or device.poll() is not None, what="gw1's port")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"past the fifo")
            assert recv_exactly(conn, 13) == b"past the fifo"
        server.send_signal(1)   # SIGHUP: every file is read again, the FIFO too
        wait_for(lambda: agents.log(server).count("pipe.toml: is a FIFO") >= 2,
                 what="the FIFO named again after the reload")
        result = run_tcprc("ctl", "--socket", server.control_socket, "devices", timeout=30)
        assert result.returncode == 0 and "gw1" in result.stdout
        log = agents.log(server)
        assert "zero.toml: is a character device, not a regular file; skipped" in log
        assert SECRET not in log
    finally:
        agents.stop_all()
