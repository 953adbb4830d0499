"""`tcprc ctl -c SERVER.toml device add ID --host ADDR:PORT` (issue 20): a complete
device config for that server (TLS included), the secret in a file of its own,
every port clash refused in one line before anything is written, and a word on
whether the running server will pick the device up.  Real processes throughout."""

import os
import shutil
import socket
import stat

import pytest

from support.agents import Agents, run_tcprc, tcprc_command
from support.net import free_port, listening, recv_exactly
from support.tls import Pki, shared_pki
from support.waiting import wait_for
from tcprc.ops.config import load_config

pytestmark = pytest.mark.e2e


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def write_server_config(tmp_path, text):
    """The server's config as the operator keeps it: devices_dir beside it."""
    path = tmp_path / "server.toml"
    path.write_text('[server]\ndevices_dir = "devices"\n' + text)
    return path


def device_add(config, ident, *args):
    return run_tcprc("ctl", "-c", str(config), "device", "add", ident, *args, timeout=60)


@pytest.fixture
def agents(tmp_path):
    started = Agents(tmp_path)
    yield started
    started.stop_all()


def start_written_device(agents, tmp_path, device_config):
    """`tcprc device -c FILE` of the file device add wrote, with only a control socket of
    the test's own added (the default /run/tcprc/tcprc.sock is shared by every test)."""
    sock = str(tmp_path / "written-device.sock")
    with open(str(device_config), "a") as handle:
        handle.write('\n[control]\nsocket = "%s"\n' % sock)
    import subprocess
    log = open(str(tmp_path / "written-device.log"), "w+")
    proc = subprocess.Popen(tcprc_command("device", "-c", str(device_config)),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    proc.log_file, proc.control_socket = log, sock
    agents.procs.append(proc)
    return proc


def tls_server_files(tmp_path, pinned):
    """(cert, key) of a server certificate for 127.0.0.1: from the shared PKI, whose
    ca/ holds ca.crt beside it; or a copy alone in a directory (nothing but a pin)."""
    pki = shared_pki()
    cert, key = pki.path("ca/localhost.crt"), pki.path("ca/localhost.key")
    if pinned:
        alone = tmp_path / "alone"
        alone.mkdir()
        cert, key = shutil.copy(cert, str(alone)), shutil.copy(key, str(alone))
    return cert, key


@pytest.mark.parametrize("pinned", [False, True], ids=["ca-beside-the-cert", "pinned"])
def test_a_device_set_up_from_device_add_authenticates_over_tls(tmp_path, agents, service, pinned):
    cert, key = tls_server_files(tmp_path, pinned)
    listen, port = free_port(), free_port()
    server = agents.start("server", config=(
        '[server]\nlisten = "127.0.0.1:%d"\ndevices_dir = "%s"\ntls_cert = "%s"\ntls_key = "%s"\n'
        % (listen, tmp_path / "devices", cert, key)))
    wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
    # device add reads the server's own config file (Agents wrote it): -c of the server.
    config = tmp_path / "server-0.toml"
    device_dir = tmp_path / "gw7"
    device_dir.mkdir()
    done = device_add(config, "gw7", "--host", "127.0.0.1:%d" % port, "--local",
                      "%s:%d" % service.address, "--device-config", str(device_dir / "tcprc.toml"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "tcprc ctl: role server, from %s: it has a [server] table (--role to " \
                          "choose)\n" % config
    assert ("the server answering on %s serves gw7 within 5 s (its devices_dir scan), or at "
            "once on SIGHUP" % server.control_socket) in done.stdout
    text = (device_dir / "tcprc.toml").read_text()
    secret = (device_dir / "gw7.secret").read_text().strip()
    assert len(secret) >= 43 and secret not in text and secret not in done.stdout
    assert 'secret_file = "gw7.secret"' in text and "tls = true" in text
    assert mode(device_dir / "tcprc.toml") == mode(device_dir / "gw7.secret") == 0o600
    assert mode(tmp_path / "devices" / "gw7.toml") == 0o600
    if pinned:
        pin = Pki("").make("pin", cert).strip()
        assert 'tls_fingerprint = "%s"' % pin in text and "tls_ca" not in text
    else:
        assert 'tls_ca = "ca.crt"' in text and "tls_fingerprint" not in text
        assert (device_dir / "ca.crt").read_bytes() == open(
            os.path.join(os.path.dirname(cert), "ca.crt"), "rb").read()
    device = start_written_device(agents, tmp_path, device_dir / "tcprc.toml")
    wait_for(lambda: listening(port) or device.poll() is not None, timeout=20,
             what="gw7's port (the scan found its file, the device got in)")
    assert device.poll() is None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"over tls")
        assert recv_exactly(conn, 8) == b"over tls"
    status = run_tcprc("ctl", "--socket", device.control_socket, "status").stdout
    assert "state: up" in status and "protocol: v2" in status and "tls: TLSv1." in status, status
    assert secret not in agents.log(server)


def test_printed_config_is_complete_and_inline_only_on_request(tmp_path):
    config = write_server_config(tmp_path, 'listen = "127.0.0.1:9000"\n[control]\nsocket = "%s"\n'
                                 % (tmp_path / "none.sock"))
    done = device_add(config, "gw8", "--host", "127.0.0.1:%d" % free_port())
    assert done.returncode == 0, done.stderr
    secret = [l for l in done.stdout.splitlines() if l.startswith("secret: ")][0][len("secret: "):]
    assert 'secret_file = "gw8.secret"' in done.stdout and ('"%s"' % secret) not in done.stdout
    assert done.stdout.splitlines()[-1].startswith(
        "no server answers on %s (No such file or directory): gw8 is served once the server "
        "starts with %s" % (tmp_path / "none.sock", config))
    done = device_add(config, "gw9", "--host", "127.0.0.1:%d" % free_port(), "--inline-secret",
                      "--local", "127.0.0.1:22")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    secret = [l for l in lines if l.startswith("secret: ")][0][len("secret: "):]
    start = lines.index("[device]") - 2
    printed = tmp_path / "printed.toml"
    fd = os.open(str(printed), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines[start:-1]) + "\n")
    device = load_config(str(printed), "device").device   # as `tcprc device -c` reads it
    assert (device.server, device.local, device.id, device.protocol) == (
        ("127.0.0.1:9000",), "127.0.0.1:22", "gw9", "v2")
    assert device.secret.reveal() == secret.encode() and device.tls is False


@pytest.mark.parametrize("extra, host, clash", [
    ("", "127.0.0.1:{listen}", "[server] listen 127.0.0.1:{listen}"),
    ("", "0.0.0.0:2222", "[server] host 127.0.0.1:2222"),
    ('http = "127.0.0.1:9100"\n', ":9100", "[server] http 127.0.0.1:9100"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret_file = "gw1.secret"\n',
     "127.0.0.1:2301", "the host of device 'gw1' 127.0.0.1:2301"),
    ('[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret_file = "gw1.secret"\n'
     '[server.devices.gw1.services.web]\nhost = "0.0.0.0:2380"\n',
     "127.0.0.2:2380", "service 'web' of device 'gw1' 0.0.0.0:2380"),
    ("FILE", "127.0.0.1:2305", "the host of device 'gw5' (devices_dir) 127.0.0.1:2305"),
])
def test_a_port_the_server_has_is_refused_in_one_line_and_nothing_is_written(
        tmp_path, extra, host, clash):
    listen = free_port()
    (tmp_path / "gw1.secret").write_text("correct-horse-battery-staple-42")
    (tmp_path / "gw1.secret").chmod(0o600)
    config = write_server_config(tmp_path, 'listen = "127.0.0.1:%d"\n%s'
                                 % (listen, "" if extra == "FILE" else extra))
    (tmp_path / "devices").mkdir()
    if extra == "FILE":
        (tmp_path / "devices" / "gw5.toml").write_text(
            'host = "127.0.0.1:2305"\nsecret_file = "../gw1.secret"\n')
    before = sorted(os.listdir(str(tmp_path / "devices")))
    done = device_add(config, "gw7", "--host", host.format(listen=listen),
                      "--device-config", str(tmp_path / "gw7-device.toml"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == "tcprc ctl: device add: --host %s collides with %s" % (
        host.format(listen=listen), clash.format(listen=listen))
    assert sorted(os.listdir(str(tmp_path / "devices"))) == before
    assert not (tmp_path / "gw7-device.toml").exists() and not (tmp_path / "gw7.secret").exists()


@pytest.mark.parametrize("args, config_text, error", [
    (["--host", "127.0.0.1:0"], "", "--host 127.0.0.1:0: port 0 would be a different port at "
                                    "every start; a device's clients need a fixed one"),
    (["--host", "127.0.0.1:2307"], 'listen = "0.0.0.0:9000"\n',
     "[server] listen is 0.0.0.0:9000: give --server ADDR:PORT, the address the device dials"),
    (["--host", "127.0.0.1:2307"], '[server.devices.gw7]\nhost = "127.0.0.1:2308"\n'
                                   'secret_file = "s"\n',
     "device gw7 is already in [server.devices.gw7] of {config}"),
])
def test_what_the_server_would_not_serve_is_refused(tmp_path, args, config_text, error):
    (tmp_path / "s").write_text("correct-horse-battery-staple-42")
    (tmp_path / "s").chmod(0o600)
    config = write_server_config(tmp_path, config_text or 'listen = "127.0.0.1:9000"\n')
    done = device_add(config, "gw7", *args)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "tcprc ctl: device add: " + error.format(config=config)
    assert not (tmp_path / "devices").exists()


def test_a_wildcard_listen_takes_the_address_given_with_server(tmp_path):
    config = write_server_config(tmp_path, 'listen = "0.0.0.0:9000"\n')
    done = device_add(config, "gw7", "--host", "127.0.0.1:2307", "--server",
                      "tunnel.example.net:9000")
    assert done.returncode == 0, done.stderr
    assert 'server = "tunnel.example.net:9000"' in done.stdout


def test_existing_files_are_never_overwritten(tmp_path):
    config = write_server_config(tmp_path, 'listen = "127.0.0.1:9000"\n')
    (tmp_path / "gw7.secret").write_text("keep me")
    done = device_add(config, "gw7", "--host", "127.0.0.1:2307", "--device-config",
                      str(tmp_path / "gw7.toml"))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == ("tcprc ctl: device add: %s exists already: remove "
                                            "it first to replace it" % (tmp_path / "gw7.secret"))
    assert (tmp_path / "gw7.secret").read_text() == "keep me"
    assert not (tmp_path / "gw7.toml").exists() and not (tmp_path / "devices").exists()
    assert device_add(config, "gw7", "--host", "127.0.0.1:2307").returncode == 0
    again = device_add(config, "gw7", "--host", "127.0.0.1:2309")
    assert again.returncode == 1 and "exists already" in again.stderr


def test_the_device_config_s_directory_is_made_private_when_missing(tmp_path):
    config = write_server_config(tmp_path, 'listen = "127.0.0.1:9000"\n')
    where = tmp_path / "out" / "gw7"
    done = device_add(config, "gw7", "--host", "127.0.0.1:2307", "--device-config",
                      str(where / "tcprc.toml"))
    assert done.returncode == 0, done.stderr
    assert mode(where) == 0o700 and mode(where / "gw7.secret") == 0o600
    assert load_config(str(where / "tcprc.toml"), "device").device.id == "gw7"


def test_a_server_asking_for_device_certificates_gets_a_config_naming_them(tmp_path):
    pki = shared_pki()
    config = write_server_config(tmp_path, 'listen = "127.0.0.1:9000"\ntls_cert = "%s"\n'
                                 'tls_key = "%s"\ntls_client_ca = "%s"\n' % (
                                     pki.path("ca/localhost.crt"), pki.path("ca/localhost.key"),
                                     pki.path("ca/ca.crt")))
    done = device_add(config, "gw7", "--host", "127.0.0.1:2307")
    assert done.returncode == 0, done.stderr
    assert 'tls_cert = "gw7.crt"' in done.stdout and 'tls_key = "gw7.key"' in done.stdout
    assert "tcprc-pki device CA-DIR gw7" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only root writes files for another user")
def test_run_as_root_it_gives_what_it_writes_to_the_servers_user(tmp_path):
    """/etc/tcprc owned by the server's user (the units run it as tcprc): devices_dir and
    the device file, made by root, go to that user, or the server could not read them."""
    etc = tmp_path / "etc"
    etc.mkdir()
    os.chown(str(etc), 65534, 65534)
    config = write_server_config(etc, 'listen = "127.0.0.1:9000"\n')
    done = device_add(config, "gw7", "--host", "127.0.0.1:2307")
    assert done.returncode == 0, done.stderr
    for path in (etc / "devices", etc / "devices" / "gw7.toml"):
        info = os.stat(str(path))
        assert (info.st_uid, info.st_gid) == (65534, 65534), path
    assert mode(etc / "devices") == 0o700 and mode(etc / "devices" / "gw7.toml") == 0o600
