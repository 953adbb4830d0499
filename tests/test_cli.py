"""`tcprc server` and `tcprc device` as real processes; command-line errors (config files: test_config.py)."""

import re
import signal
import socket
import time

import pytest

from support.agents import run_tcprc, start_tunnel
from support.net import free_port, port_accepts, recv_exactly
from support.waiting import wait_for


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.e2e
@pytest.mark.parametrize("role, content, args, expected", [
    ("server", None, [], r"missing\.toml: no such file"),
    ("server", "[server\nlisten=", [], r"bad\.toml: invalid TOML"),
    ("server", "[server]\nlisten_port = 1\n", [], r"bad\.toml: unknown key 'listen_port' in \[server\] \(did you mean listen\?\)$"),
    ("server", "[server]\nlisen = \"127.0.0.1:9000\"\n", [],
     r"bad\.toml: unknown key 'lisen' in \[server\] \(did you mean listen\?\)$"),
    ("server", "[server]\nfrobnicate = 1\n", [],
     r"bad\.toml: unknown key 'frobnicate' in \[server\] \(known: allow_from, allow_readable_secrets, "),
    ("server", "[srv]\n", [], r"bad\.toml: unknown section \[srv\]"),
    ("server", "[sever]\n", [], r"bad\.toml: unknown section \[sever\] \(did you mean server\?\)$"),
    ("device", "[device]\ntls = true\ntls_ca = \"/etc/hostname\"\ntls_fingerprint = \"sha256:%s\"\n" % ("ab" * 32),
     [], r"bad\.toml: \[device\] tls_ca and tls_fingerprint exclude each other: a pin replaces "
         r"the CA and name checks; set one of them$"),
    ("device", "[device]\nreconnect_min = 120\n", [],
     r"bad\.toml: \[device\] reconnect_min \(120.0\) must not exceed reconnect_max \(60.0\)$"),
    ("server", "[server]\nlisten_timeout = \"ten\"\n", [], r"\[server\] listen_timeout must be a number"),
    ("server", "[server]\nhost = \"127.0.0.1:70000\"\n", [], r"\[server\] host port 70000 is out of range"),
    ("server", "[server]\ntakeover = 1\n", [], r"\[server\] takeover must be true or false"),
    ("server", "[server]\nconnect_address = \"h\u00e9te\"\n", [], r"\[server\] connect_address must be ASCII"),
    ("server", "", ["--listen", "nonsense"], r"--listen: expected ADDR:PORT, got 'nonsense'"),
    ("device", "", ["--server", "host:0"], r"--server: port 0 is out of range 1\.\.65535"),
    ("device", "", ["--local", "[::1]22"], r"--local: expected \[IPV6\]:PORT"),
    ("device", "[device]\nlocal = \":23\"\n", [], r"\[device\] local expected ADDR:PORT, got ':23' \(no address\)"),
    ("device", "", ["--server", ":9000"], r"--server: expected ADDR:PORT, got ':9000' \(no address\)"),
    ("device", "[device]\nallow = [\"1.2.3.4\"]\n", [], r"\[device\] allow expected ADDR:PORT"),
    ("device", "[device]\nreconnect_min = -1\n", [], r"\[device\] reconnect_min must be between"),
    ("device", "[log]\nlevel = \"loud\"\n", [], r"\[log\] level must be one of"),
    ("device", "device = 3\n", [], r"device must be a table"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, role, content, args, expected):
    name = "missing.toml" if content is None else "bad.toml"
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = run_tcprc(role, "-c", str(path), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcprc: ")
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_processes_carry_a_client_and_stop_on_sigterm(agents, service):
    server, device, host = start_tunnel(agents, service.address)
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(b"through two processes")
        assert recv_exactly(conn, 21) == b"through two processes"
    for proc in (device, server):
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        err = agents.log(proc)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 3.0
        assert "Traceback" not in err
    assert "clients accepted on 127.0.0.1:%d" % host[1] in err   # the server's log


@pytest.mark.e2e
def test_sigint_stops_cleanly(agents, service):
    server, device, host = start_tunnel(agents, service.address)
    device.send_signal(signal.SIGINT)
    device.wait(10)
    assert device.returncode == 0 and "Traceback" not in agents.log(device)
    wait_for(lambda: not port_accepts(host), what="host port closed after the device left")


@pytest.mark.e2e
def test_server_reports_a_port_in_use(agents):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_tcprc("server", "--listen", "127.0.0.1:%d" % port, "--host", "127.0.0.1:0",
                           "-c", write(agents.tmp / "s.toml", "[control]\nsocket = \"\"\n"))
    assert result.returncode == 1
    assert "cannot start the server" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_device_started_before_its_server_finds_it(agents, service):
    listen, host = free_port(), free_port()
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen, "--local", "%s:%d" % service.address,
                          config="[device]\nreconnect_min = 0.05\nreconnect_max = 0.2\n")
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % host)
    # The host port only opens on the device's LISTEN: the device found the server by itself.
    wait_for(lambda: port_accepts(("127.0.0.1", host)), timeout=15, what="the device to reconnect")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"late")
        assert recv_exactly(conn, 4) == b"late"
    assert device.poll() is None and server.poll() is None


@pytest.mark.e2e
@pytest.mark.parametrize("args, usage, error", [
    (["server", "--lisen", "127.0.0.1:9000"], "usage: tcprc server ",
     "tcprc server: error: unrecognized arguments: --lisen 127.0.0.1:9000 (did you mean --listen?)"),
    (["device", "--sever=127.0.0.1:9000"], "usage: tcprc device ",
     "tcprc device: error: unrecognized arguments: --sever=127.0.0.1:9000 (did you mean --server?)"),
    (["ctl", "--sokcet", "/x", "status"], "usage: tcprc ctl ",
     "tcprc ctl: error: unrecognized arguments: --sokcet (did you mean --socket?)"),
    (["server", "stray"], "usage: tcprc server ", "tcprc server: error: unrecognized arguments: stray"),
])
def test_a_mistyped_flag_gets_its_subcommands_usage_and_a_suggestion(args, usage, error):
    result = run_tcprc(*args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(usage) and lines[-1] == error, result.stderr


@pytest.mark.e2e
def test_version_and_help():
    result = run_tcprc("--version")
    assert result.returncode == 0 and result.stdout.startswith("tcprc ")
    result = run_tcprc("--help")
    assert result.returncode == 0
    for word in ("device", "server", "demo", "ctl"):
        assert word in result.stdout


@pytest.mark.e2e
def test_demo_runs(tmp_path):
    result = run_tcprc("demo", "--megabytes", "4", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "sha256 matches" in result.stdout
