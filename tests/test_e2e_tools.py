"""Programs nobody here wrote, through `tcprc server` + `tcprc device` processes:
curl from an HTTP server, an OpenSSH session, iperf3.  Each skips when its tool is missing.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from support.agents import start_tunnel
from support.net import free_port, listening
from support.waiting import wait_for

pytestmark = pytest.mark.e2e   # real processes throughout


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip("%s is not installed (apt-get install %s)" % (tool, tool))


@pytest.fixture
def background():
    procs = []

    def start(cmd, **kwargs):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_curl_fetches_a_large_file_through_the_tunnel(tmp_path, agents, background):
    need("curl")
    data = os.urandom(24 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    port = free_port()
    background([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=str(tmp_path))
    wait_for(lambda: listening(port), what="http.server")
    _, _, host = start_tunnel(agents, ("127.0.0.1", port))
    out = tmp_path / "fetched.bin"
    for _ in range(3):   # a few times: each is a new client, opened and closed
        result = subprocess.run(["curl", "-sS", "--fail", "-o", str(out), "--max-time", "60",
                                 "http://127.0.0.1:%d/big.bin" % host[1]], capture_output=True, timeout=90)
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.fixture
def sshd(tmp_path, background):
    need("sshd", "ssh", "ssh-keygen")
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() != 0:
        pytest.skip("a private sshd on 127.0.0.1 needs root here (privilege separation)")
    os.makedirs("/run/sshd", exist_ok=True)
    host_key, user_key = tmp_path / "host_key", tmp_path / "user_key"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    auth = tmp_path / "authorized_keys"
    auth.write_text((tmp_path / "user_key.pub").read_text())
    os.chmod(str(auth), 0o600)
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey %s" % host_key,
        "AuthorizedKeysFile %s" % auth, "PidFile %s" % (tmp_path / "sshd.pid"),
        "UsePAM no", "StrictModes no", "PasswordAuthentication no", "PermitRootLogin prohibit-password",
        "KbdInteractiveAuthentication no", ""]))
    background([sshd_bin, "-D", "-e", "-f", str(config)])
    wait_for(lambda: listening(port), what="sshd")
    return port, user_key


def test_openssh_session_through_the_tunnel(agents, sshd, tmp_path):
    port, key = sshd
    _, _, host = start_tunnel(agents, ("127.0.0.1", port))
    payload = os.urandom(4 << 20)
    ssh = ["ssh", "-p", str(host[1]), "-i", str(key), "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
           "-o", "ConnectTimeout=20", "root@127.0.0.1"]
    result = subprocess.run(ssh + ["echo tunnel-$((6*7)); sha256sum"], input=payload,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "tunnel-42"
    assert lines[1].split()[0] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3_through_the_tunnel(agents, background, reverse):
    need("iperf3")
    port = free_port()
    background(["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"])
    wait_for(lambda: listening(port), what="iperf3 server")
    _, _, host = start_tunnel(agents, ("127.0.0.1", port))
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(host[1]), "-t", "2", "-P", "2", "-J"]
    if reverse:
        cmd.append("-R")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    report = json.loads(result.stdout)
    assert "error" not in report, report.get("error")
    received = report["end"]["sum_received"]["bytes"]
    assert received > 10 << 20, "iperf3 moved only %d bytes" % received
