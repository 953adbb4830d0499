"""TLS for tests: certificates made by scripts/tcprc-pki, TLS transport pairs, and a
legacy-session tunnel whose two links run over TlsTransport (built from parts, as
the apps will once TLS is wired in)."""

import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Dict, List, Optional, Tuple

from tcprc.engine.loop import Loop
from tcprc.engine.sockets import tune_uplink_socket
from tcprc.engine.tls import TlsContext, TlsTransport, device_context, server_context
from tcprc.wire import frames as protocol
from tcprc.wire.server_session import ServerSession
from tcprc.wire.session import DeviceSession

from .net import HostPort, tcp_pair
from .tunnel import settings
from .waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKI = os.path.join(ROOT, "scripts", "tcprc-pki")
SHELL = shutil.which("dash") or "sh"   # dash where it is: the script must be POSIX sh


class Pki:
    """A directory of certificates made with tcprc-pki; `path(name)` of a file in it."""

    def __init__(self, directory: str):
        self.dir = directory

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SHELL, PKI] + list(args), capture_output=True, text=True,
                              timeout=60)

    def make(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


def make_pki(directory: str) -> Pki:
    """Two CAs (`ca/`, and `other/` that nobody trusts) with the certificates the tests use."""
    pki = Pki(directory)
    ca, other = pki.path("ca"), pki.path("other")
    pki.make("ca", ca)
    pki.make("ca", other)
    pki.make("server", ca, "localhost", "--ip", "127.0.0.1")
    pki.make("server", ca, "old-server", "--ip", "127.0.0.1", "--expired")
    pki.make("device", ca, "dev-1")
    pki.make("device", ca, "old-device", "--expired")
    pki.make("device", other, "stranger")
    pki.make("server", other, "impostor", "--ip", "127.0.0.1")
    return pki


_shared: Dict[str, Pki] = {}


def shared_pki() -> Pki:
    """One PKI per test process (made on first use, removed at exit)."""
    if shutil.which("openssl") is None:
        import pytest
        pytest.skip("the openssl command is missing: scripts/tcprc-pki needs it")
    if "pki" not in _shared:
        directory = tempfile.mkdtemp(prefix="tcprc-pki-")
        import atexit
        atexit.register(shutil.rmtree, directory, True)
        _shared["pki"] = make_pki(directory)
    return _shared["pki"]


def crt(pki: Pki, ca: str, name: str) -> Tuple[str, str]:
    return pki.path("%s/%s.crt" % (ca, name)), pki.path("%s/%s.key" % (ca, name))


def server_tls(pki: Pki, name: str = "localhost", ca: str = "ca",
               client_ca: Optional[str] = None) -> TlsContext:
    cert, key = crt(pki, ca, name)
    return server_context(cert, key, pki.path(client_ca + "/ca.crt") if client_ca else None)


def device_tls(pki: Pki, ca: str = "ca", server_name: str = "localhost",
               fingerprint: Optional[str] = None, device: Optional[Tuple[str, str]] = None) -> TlsContext:
    cert, key = crt(pki, device[0], device[1]) if device else (None, None)
    return device_context(server_name, ca=None if fingerprint else pki.path(ca + "/ca.crt"),
                          fingerprint=fingerprint, cert=cert, key=key)


def handshake_pair(device: TlsContext, server: TlsContext, timeout: float = 10.0
                   ) -> Tuple[TlsTransport, TlsTransport, List[Optional[BaseException]]]:
    """(device transport, server transport, [device error, server error]) after both
    handshakes ran at once, each in its own thread as the agents will run them."""
    near, far = tcp_pair()
    ends = (TlsTransport(near, device), TlsTransport(far, server))
    errors: List[Optional[BaseException]] = [None, None]

    def shake(i: int) -> None:
        try:
            ends[i].handshake(timeout)
        except Exception as exc:   # the test asserts on it
            errors[i] = exc
            ends[i].shutdown()     # as an agent does: drop the connection
    threads = [threading.Thread(target=shake, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return ends[0], ends[1], errors


def tls_transport_pair() -> Tuple[TlsTransport, TlsTransport]:
    """For the transport conformance suite: two ends with a finished handshake."""
    pki = shared_pki()
    near, far, errors = handshake_pair(device_tls(pki), server_tls(pki))
    assert errors == [None, None], errors
    return near, far


class TlsTunnel:
    """A server's and a device's link with legacy sessions over TlsTransport: the
    server's real ServerApp claims the host port; clients reach `target`."""

    def __init__(self, target: HostPort, pki: Pki, link_keys: Optional[Dict[str, Any]] = None,
                 plain: bool = False):
        from tcprc.device.link import device_link
        from tcprc.device.policy import TargetPolicy
        from tcprc.engine.transport import PlainTransport
        from tcprc.server.app import ServerApp
        from tcprc.server.ids import ClientIds
        from tcprc.server.link import ServerLink
        keys = dict(link_keys or {})
        sset = settings("server", listen="127.0.0.1:0", host="127.0.0.1:0", **keys)
        dset = settings("device", server="127.0.0.1:1", local="%s:%d" % target, **keys)
        self.app = ServerApp(sset)    # not started: this tunnel hands it its uplink
        if plain:
            near, far = tcp_pair()
            dev, srv = PlainTransport(near), PlainTransport(far)
        else:
            dev, srv, errors = handshake_pair(device_tls(pki), server_tls(pki))
            assert errors == [None, None], errors
        tune_uplink_socket(dev.sock, dset)
        tune_uplink_socket(srv.sock, sset)
        session = ServerSession(ClientIds(sset.id_quarantine),
                                protocol.encode_connect_payload(sset.connect_address,
                                                                sset.connect_port))
        self.server = ServerLink(srv, Loop(), session, sset, "uplink server", self.app.link_parts,
                                 "127.0.0.1")
        self.device = device_link(dev, Loop(), DeviceSession(), dset, "uplink device",
                                  TargetPolicy(target, set()))
        self._threads = [threading.Thread(target=link.run, daemon=True)
                         for link in (self.server, self.device)]
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.app.host_address, what="the host port")

    @property
    def host(self) -> HostPort:
        return self.app.host_address

    def close(self) -> None:
        for link in (self.device, self.server):
            link.stop("test over")
        for link in (self.device, self.server):
            link.wait_stopped(10)
