"""TLS through the real apps: configuration keys in, one line on each side for every
way it can fail, the certificate tied to the proven device id, and a tunnel that works."""

import hashlib
import socket
import threading

import pytest

from support.net import recv_exactly
from support.services import Service, pattern
from support.tls import shared_pki
from support.tunnel import settings, start_device, start_server
from support.waiting import wait_for
from tcprc.errors import ConfigError
from tcprc.server.app import ServerApp

SECRET = "correct-horse-battery-staple-42"


@pytest.fixture(scope="module")
def pki():
    return shared_pki()


def _server(pki, cert="ca/localhost", client_ca=None, **keys):
    tls = dict(tls_cert=pki.path(cert + ".crt"), tls_key=pki.path(cert + ".key"))
    if client_ca:
        tls["tls_client_ca"] = pki.path(client_ca + "/ca.crt")
    return start_server(**dict(tls, **keys))


def _device(app, target, pki, **keys):
    return start_device(app, target, **dict(dict(tls=True, tls_ca=pki.path("ca/ca.crt"),
                                                  tls_server_name="localhost"), **keys))


def _failure(device, caplog, server_words):
    """The device's one-line error, once it is there and the server's line too."""
    error = wait_for(lambda: device.status()["last_error"], what="the device's error")
    wait_for(lambda: any(server_words in r.getMessage() for r in caplog.records
                         if r.name == "tcprc.server"), what="the server's line: " + server_words)
    return error


def test_a_tls_tunnel_carries_streams_both_ways(pki):
    service = Service("echo")
    app = _server(pki)
    device = _device(app, service.address, pki)
    try:
        wait_for(lambda: app.host_address and device.status()["protocol"] == "v2",
                 what="the session")
        assert device.status()["tls"].startswith("TLSv1.") and app.status()["tls"] == \
            device.status()["tls"]
        digests, data = [], pattern(1 << 20)

        def echo():
            with socket.create_connection(app.host_address, timeout=30) as conn:
                sender = threading.Thread(target=conn.sendall, args=(data,))
                sender.start()
                digests.append(hashlib.sha256(recv_exactly(conn, len(data))).digest())
                sender.join()
        threads = [threading.Thread(target=echo) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert digests == [hashlib.sha256(data).digest()] * 8
    finally:
        device.close()
        app.close()
        service.close()


def test_a_pinned_server_certificate_replaces_the_ca(pki, service):
    pin = pki.make("pin", pki.path("ca/localhost.crt")).strip()
    app = _server(pki)
    device = _device(app, service.address, pki, tls_ca="", tls_fingerprint=pin)
    try:
        wait_for(lambda: app.host_address, what="the session")
        with socket.create_connection(app.host_address, timeout=10) as conn:
            conn.sendall(b"pinned")
            assert recv_exactly(conn, 6) == b"pinned"
    finally:
        device.close()
        app.close()


@pytest.mark.parametrize("server_cert, device_keys, device_words, server_words", [
    ("other/impostor", {}, "unknown CA", "TLS failed"),
    ("ca/localhost", {"tls_server_name": "gateway.example"}, "wrong name", "TLS failed"),
    ("ca/old-server", {"tls_server_name": "old-server"}, "expired", "TLS failed"),
    ("ca/localhost", {"tls_ca": "", "tls_fingerprint": "sha256:" + "ab" * 32},
     "pin mismatch", "closed the TLS session before its LISTEN"),
], ids=["unknown-ca", "wrong-name", "expired", "wrong-pin"])
def test_each_server_certificate_failure_is_one_line_on_each_side(
        pki, service, caplog, server_cert, device_keys, device_words, server_words):
    app = _server(pki, cert=server_cert)
    device = _device(app, service.address, pki, reconnect_min=30, reconnect_max=30,
                     **device_keys)
    try:
        error = _failure(device, caplog, server_words)
        assert error.startswith("TLS with 127.0.0.1:") and device_words in error
        assert app.host_address is None
    finally:
        device.close()
        app.close()


@pytest.mark.parametrize("device_cert, device_words, server_words", [
    (None, "", "missing device certificate"),
    ("other/stranger", "", "unknown CA"),
], ids=["no-certificate", "foreign-ca"])
def test_a_server_that_requires_device_certificates_refuses_the_others(
        pki, service, caplog, device_cert, device_words, server_words):
    app = _server(pki, client_ca="ca")
    keys = {}
    if device_cert:
        keys = dict(tls_cert=pki.path(device_cert + ".crt"), tls_key=pki.path(device_cert + ".key"))
    device = _device(app, service.address, pki, reconnect_min=30, reconnect_max=30, **keys)
    try:
        error = _failure(device, caplog, server_words)
        assert "TLS" in error or "uplink" in error
        assert app.host_address is None
    finally:
        device.close()
        app.close()


def test_a_device_certificate_must_name_the_id_it_proves(pki, service, caplog):
    devices = {"gw1": {"secret": SECRET, "host": "127.0.0.1:0"}}
    app = _server(pki, client_ca="ca", devices=devices)
    cert = dict(tls_cert=pki.path("ca/dev-1.crt"), tls_key=pki.path("ca/dev-1.key"))
    device = _device(app, service.address, pki, id="gw1", secret=SECRET,
                     reconnect_min=30, reconnect_max=30, **cert)
    try:
        error = _failure(device, caplog, "its certificate names dev-1, not gw1")
        assert "rejected" in error
        assert app.device_host_address("gw1") is None
    finally:
        device.close()
        app.close()


def test_a_device_whose_certificate_names_its_id_gets_its_port(pki, service):
    devices = {"dev-1": {"secret": SECRET, "host": "127.0.0.1:0"}}
    app = _server(pki, client_ca="ca", devices=devices)
    cert = dict(tls_cert=pki.path("ca/dev-1.crt"), tls_key=pki.path("ca/dev-1.key"))
    device = _device(app, service.address, pki, id="dev-1", secret=SECRET, **cert)
    try:
        host = wait_for(lambda: app.device_host_address("dev-1"), what="dev-1's port")
        with socket.create_connection(host, timeout=10) as conn:
            conn.sendall(b"mutual")
            assert recv_exactly(conn, 6) == b"mutual"
    finally:
        device.close()
        app.close()


def test_a_plaintext_device_on_a_tls_port(pki, service, caplog):
    app = _server(pki)
    device = _device(app, service.address, pki, tls=False, tls_ca="", tls_server_name="",
                     reconnect_min=30, reconnect_max=30)
    try:
        error = _failure(device, caplog, "does not speak TLS (it sent a tcprc LISTEN frame)")
        assert "the port expects TLS" in error
    finally:
        device.close()
        app.close()


def test_a_tls_device_on_a_plaintext_port(pki, service, caplog):
    app = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:0"))
    app.start()
    device = _device(app, service.address, pki, reconnect_min=30, reconnect_max=30)
    try:
        error = _failure(device, caplog, "the device speaks TLS, this uplink port is plaintext")
        assert error.startswith("TLS with") and "plaintext port" in error
    finally:
        device.close()
        app.close()


def test_a_missing_certificate_stops_the_start(pki, tmp_path):
    with pytest.raises(ConfigError):
        ServerApp(settings("server", listen="127.0.0.1:0", tls_cert=pki.path("ca/localhost.crt"),
                           tls_key=str(tmp_path / "absent.key")))
