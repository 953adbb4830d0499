"""Secrets in files others may read are refused, as ssh refuses an unprotected key:
a secret_file, or a config or device file holding a secret, that group or others
can read (issue 20).  `allow_readable_secrets = true` accepts them.  And the
rotation key previous_secret_file beside previous_secret."""

import os
import socket

import pytest

from support.agents import run_tcprc
from support.net import recv_exactly
from support.tunnel import start_device, start_server
from support.waiting import wait_for
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import ConfigError, load_config
from tcprc.ops.devdir import DeviceFiles

SECRET = "correct-horse-battery-staple-42"
OLD = "the-old-secret-of-enough-bits-1"


@pytest.fixture
def shared(tmp_path):
    """A directory group and others may enter (0755), as /etc/tcprc is: pytest's own
    temporary directories are 0700, and a file in one is private whatever its mode."""
    folder = tmp_path / "etc"
    folder.mkdir()
    folder.chmod(0o755)
    return folder


def put(path, text, mode):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def refusal(path, what, section):
    return ("%s is readable by group or others and holds %s: chmod 600 %s (or set "
            "allow_readable_secrets = true in [%s])" % (path, what, path, section))


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_readable_secret_file_stops_the_device_with_the_chmod_that_fixes_it(shared, mode):
    secret = put(shared / "gw1.secret", SECRET, mode)
    config = put(shared / "tcprc.toml", '[device]\nid = "gw1"\nsecret_file = "gw1.secret"\n', 0o644)
    result = run_tcprc("device", "-c", config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["tcprc: %s: [device] secret_file %s" % (
        config, refusal(secret, "a secret", "device"))]
    assert SECRET not in result.stderr
    os.chmod(secret, 0o600)   # the fix it names
    assert load_config(config, "device").device.secret.reveal() == SECRET.encode()


@pytest.mark.e2e
def test_a_readable_config_holding_a_secret_is_refused(shared):
    config = put(shared / "tcprc.toml", '[device]\nid = "gw1"\nsecret = "%s"\n' % SECRET, 0o644)
    result = run_tcprc("device", "-c", config)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["tcprc: " + refusal(
        config, "an inline secret ([device] secret)", "device")]
    os.chmod(config, 0o600)
    assert load_config(config, "device").device.secret.reveal() == SECRET.encode()


def test_a_readable_server_config_holding_a_device_secret_is_refused(shared):
    config = put(shared / "server.toml", '[server.devices.gw1]\nhost = "127.0.0.1:2301"\n'
                 'secret_file = "gw1.secret"\nprevious_secret = "%s"\n' % OLD, 0o640)
    put(shared / "gw1.secret", SECRET, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(config, "server")
    assert str(caught.value) == refusal(
        config, "an inline secret ([server.devices.gw1] previous_secret)", "server")


def test_allow_readable_secrets_accepts_them(shared):
    put(shared / "gw1.secret", SECRET, 0o644)
    config = put(shared / "tcprc.toml", '[device]\nid = "gw1"\nsecret_file = "gw1.secret"\n'
                 'allow_readable_secrets = true\n', 0o644)
    assert load_config(config, "device").device.secret.reveal() == SECRET.encode()
    config = put(shared / "server.toml", '[server]\nallow_readable_secrets = true\n'
                 '[server.devices.gw1]\nhost = "127.0.0.1:2301"\nsecret = "%s"\n' % SECRET, 0o644)
    assert load_config(config, "server").server.devices["gw1"].secret.reveal() == SECRET.encode()


def test_a_readable_file_in_a_private_directory_is_private(tmp_path):
    # tmp_path is 0700: nobody but its owner reaches the 0644 files in it.
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    put(tmp_path / "gw1.secret", SECRET, 0o644)
    config = put(tmp_path / "tcprc.toml", '[device]\nid = "gw1"\nsecret_file = "gw1.secret"\n',
                 0o644)
    assert load_config(config, "device").device.secret.reveal() == SECRET.encode()


def test_a_readable_device_file_with_a_secret_is_skipped_with_one_line(shared, caplog):
    put(shared / "gw1.toml", 'host = "127.0.0.1:2301"\nsecret = "%s"\n' % SECRET, 0o644)
    put(shared / "gw2.toml", 'host = "127.0.0.1:2302"\nsecret_file = "gw2.secret"\n', 0o644)
    put(shared / "gw2.secret", SECRET, 0o600)
    put(shared / "gw3.toml", 'host = "127.0.0.1:2303"\nsecret_file = "gw3.secret"\n', 0o600)
    put(shared / "gw3.secret", SECRET, 0o644)
    allowed = []
    files = DeviceFiles(str(shared), lambda: bool(allowed))
    assert sorted(files.scan(True)) == ["gw2"]   # a device file without a secret may be 0644
    lines = sorted(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert lines == [
        refusal(shared / "gw1.toml", "an inline secret (secret)", "server") + "; skipped",
        "%s: secret_file %s; skipped" % (shared / "gw3.toml", refusal(
            shared / "gw3.secret", "a secret", "server"))]
    assert SECRET not in caplog.text
    allowed.append(True)   # [server] allow_readable_secrets = true, then SIGHUP
    assert sorted(files.scan(True)) == ["gw1", "gw2", "gw3"]


def test_config_save_refuses_to_put_a_secret_into_a_readable_file(shared):
    config = put(shared / "tcprc.toml", '[device]\nid = "gw1"\nsecret = "%s"\n' % SECRET, 0o600)
    cfg = load_config(config, "device")
    from tcprc.device.app import DeviceApp
    parser = CommandParser(DeviceApp(cfg.device), cfg)
    os.chmod(config, 0o644)   # opened up while the agent runs
    assert parser.execute("config set device.secret %s" % OLD)[-1] == "OK"
    assert parser.execute("config save") == ["ERROR not saved: " + refusal(
        config, "an inline secret ([device] secret)", "device")]
    assert OLD not in open(config).read()
    os.chmod(config, 0o600)
    assert parser.execute("config save")[-1] == "OK"
    assert load_config(config, "device").device.secret.reveal() == OLD.encode()
    assert os.stat(config).st_mode & 0o777 == 0o600


# ---- previous_secret_file ----------------------------------------------------------------

def test_previous_secret_file_still_proves_the_device_while_it_rotates(tmp_path, service):
    put(tmp_path / "gw1.secret", SECRET, 0o600)
    put(tmp_path / "gw1.old", OLD + "\n", 0o600)
    config = put(tmp_path / "server.toml", '[server.devices.gw1]\nhost = "127.0.0.1:0"\n'
                 'secret_file = "gw1.secret"\nprevious_secret_file = "gw1.old"\n', 0o600)
    entry = load_config(config, "server").server.devices["gw1"]
    assert entry.previous.reveal() == OLD.encode()
    app = start_server(devices={"gw1": {"host": "127.0.0.1:0",
                                        "secret_file": str(tmp_path / "gw1.secret"),
                                        "previous_secret_file": str(tmp_path / "gw1.old")}})
    device = start_device(app, service.address, id="gw1", secret=OLD)   # not yet rotated
    try:
        host = wait_for(lambda: app.device_host_address("gw1"), what="gw1 up with its old secret")
        with socket.create_connection(host, timeout=10) as conn:
            conn.sendall(b"old")
            assert recv_exactly(conn, 3) == b"old"
    finally:
        device.close()
        app.close()


@pytest.mark.parametrize("table, expected", [
    ('previous_secret = "%s"\nprevious_secret_file = "x"\n' % OLD,
     "previous_secret and previous_secret_file are exclusive: set one of them"),
    ('previous_secret_file = "missing"\n', "previous_secret_file {dir}/missing: no such file"),
    ('previous_secret = "short"\n', "previous_secret is shorter than 128 bits: use at least 32 "
                                    "hex digits or 22 other characters (e.g. openssl rand -hex 16)"),
])
def test_previous_secret_errors_are_one_line(tmp_path, table, expected):
    config = put(tmp_path / "server.toml", '[server.devices.gw1]\nhost = "127.0.0.1:2301"\n'
                 'secret = "%s"\n%s' % (SECRET, table), 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(config, "server")
    assert str(caught.value) == "%s: [server.devices.gw1] %s" % (
        config, expected.format(dir=tmp_path))
