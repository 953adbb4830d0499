"""Real etcd for the cluster tests and scripts/cluster-bench: one or three
members on 127.0.1.x loopback addresses (Linux routes all of 127/8 to lo),
data on /dev/shm (etcd fsyncs every write; tmpfs makes that free), free
ports, names unique per run.  EtcdMissing when /usr/bin/etcd (Debian's
etcd-server) is not installed; the tests skip then (support.etcd)."""

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from typing import List, Optional

from .netutil import free_port, wait_for

ETCD = "/usr/bin/etcd"
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


class EtcdMissing(Exception):
    """etcd is not installed here."""


def etcd_missing() -> str:
    """Why etcd cannot run here, or ""."""
    if not os.access(ETCD, os.X_OK):
        return "etcd is not installed (%s, Debian package etcd-server)" % ETCD
    return ""


def _addresses(count: int) -> List[str]:
    """Distinct 127.0.1.x addresses; bindable now (one is in use if taken by a port)."""
    return ["127.0.1.%d" % n for n in random.sample(range(2, 255), count)]


class EtcdMember:
    def __init__(self, name: str, host: str, data_dir: str):
        self.name = name
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = data_dir
        self.proc = None          # type: Optional[subprocess.Popen]
        self.log_path = data_dir + ".log"

    @property
    def client_url(self) -> str:
        return "http://%s:%d" % (self.host, self.client_port)

    @property
    def peer_url(self) -> str:
        return "http://%s:%d" % (self.host, self.peer_port)

    def start(self, initial_cluster: str, token: str) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([
            ETCD, "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            # Elections in a fraction of a second: tests wait on them.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as answer:
                return json.loads(answer.read().decode()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def is_leader(self) -> bool:
        request = urllib.request.Request(self.client_url + "/v3/maintenance/status", data=b"{}",
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as answer:
                doc = json.loads(answer.read().decode())
        except (OSError, ValueError):
            return False
        return doc.get("leader") == doc.get("header", {}).get("member_id")

    def kill(self) -> None:
        """SIGKILL, as a crash; the data stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-4000:]
        except OSError:
            return ""


class EtcdCluster:
    """`size` members (1 or 3), started and healthy; close() removes everything."""

    def __init__(self, size: int = 1):
        if etcd_missing():
            raise EtcdMissing(etcd_missing())
        self.root = tempfile.mkdtemp(prefix="tcprc-etcd-", dir=SHM)
        self.token = os.path.basename(self.root)
        self.members = [EtcdMember("m%d-%s" % (i, self.token[-6:]), host,
                                   os.path.join(self.root, "m%d" % i))
                        for i, host in enumerate(_addresses(size))]
        self.initial = ",".join("%s=%s" % (m.name, m.peer_url) for m in self.members)
        try:
            for member in self.members:
                member.start(self.initial, self.token)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def urls(self) -> List[str]:
        return [m.client_url for m in self.members]

    def wait_healthy(self, members: Optional[List[EtcdMember]] = None, timeout: float = 20) -> None:
        members = self.members if members is None else members
        try:
            wait_for(lambda: all(m.healthy() for m in members), timeout, "etcd healthy")
        except AssertionError:
            raise AssertionError("etcd did not become healthy:\n" + "\n".join(
                m.log() for m in members)) from None

    def restart(self, member: EtcdMember, wait: bool = True) -> None:
        """Start a killed member again on its data (it rejoins as it was)."""
        member.start(self.initial, self.token)
        if wait:
            self.wait_healthy([member])

    def stop_all(self) -> None:
        for member in self.members:
            member.kill()

    def leader(self) -> Optional[EtcdMember]:
        for member in self.members:
            if member.is_leader():
                return member
        return None

    def close(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGCONT)
                member.kill()
        shutil.rmtree(self.root, ignore_errors=True)
