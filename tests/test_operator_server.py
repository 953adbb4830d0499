"""What an operator reads from a server and a device: warnings that are true, errors
that say which port and what for, a status that describes the server, one line
per event."""

import logging
import socket

import pytest

from support.agents import run_tcprc
from support.net import free_port
from support.tunnel import settings, start_device, start_server
from support.waiting import wait_for
from tcprc.device.app import DeviceApp

SECRET = "correct-horse-battery-staple-42"
LEGACY_WARNING = "legacy uplinks are accepted from anywhere"


def _lines(caplog, text, level=None):
    return [r.getMessage() for r in caplog.records
            if text in r.getMessage() and (level is None or r.levelno == level)]


def test_no_legacy_warning_when_legacy_sessions_are_refused(caplog):
    app = start_server(devices={"gw1": {"secret": SECRET, "host": "127.0.0.1:0"}})
    try:
        assert app.settings.legacy is False
        assert not _lines(caplog, LEGACY_WARNING)
    finally:
        app.close()
    app = start_server(legacy=False)
    app.close()
    assert not _lines(caplog, LEGACY_WARNING)


def test_turning_legacy_on_at_a_reload_warns_then(caplog):
    app = start_server(legacy=False)
    try:
        assert not _lines(caplog, LEGACY_WARNING)
        app.apply_settings(app.settings._replace(legacy=True))
        assert len(_lines(caplog, LEGACY_WARNING)) == 1
    finally:
        app.close()


@pytest.mark.e2e
def test_a_busy_listen_port_is_named_with_what_it_is_for():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_tcprc("server", "--listen", "127.0.0.1:%d" % port, "--host",
                           "127.0.0.1:%d" % free_port())
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "tcprc: cannot start the server: cannot listen for device uplinks ([server] listen) "
        "on 127.0.0.1:%d: Address already in use" % port)


def test_a_busy_device_port_is_one_warning_at_start_and_at_reload(caplog):
    with socket.socket() as busy, socket.socket() as later:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = "127.0.0.1:%d" % busy.getsockname()[1]
        app = start_server(devices={"gw1": {"secret": SECRET, "host": taken},
                                    "gw2": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()}})
        try:
            warned = _lines(caplog, "cannot listen for device gw1 (its host) on %s" % taken,
                            logging.WARNING)
            assert len(warned) == 1 and "its clients will be refused until it is free" in warned[0]
            assert not _lines(caplog, "device gw2")
            later.bind(("127.0.0.1", 0))
            later.listen(1)
            moved = "127.0.0.1:%d" % later.getsockname()[1]
            devices = dict(app.settings.devices)
            devices["gw2"] = devices["gw2"]._replace(host=moved)
            app.apply_settings(app.settings._replace(devices=devices))
            assert len(_lines(caplog, "cannot listen for device gw2 (its host) on %s" % moved)) == 1
        finally:
            app.close()


def test_server_status_describes_the_server_not_one_device(service):
    app = start_server(devices={"gw1": {"secret": SECRET, "host": "127.0.0.1:0"},
                                "gw2": {"secret": SECRET, "host": "127.0.0.1:0"}})
    device = start_device(app, service.address, id="gw1", secret=SECRET)
    try:
        wait_for(lambda: app.device_host_address("gw1"), what="gw1 up")
        status = app.status()
        assert status["devices"] == "1 up of 2 configured" and status["sessions"] == 1
        assert status["listen"] == "%s:%d" % app.listen_address
        assert status["host"] == ""            # nobody holds [server] host
        assert status["legacy"] == "refused" and status["protocol"] == "v2"
        assert "device_id" not in status and "device" not in status and "rtt" not in status
        assert status["uptime"] >= 0 and status["health"] == "ok"
    finally:
        device.close()
        app.close()


def test_a_refused_device_logs_one_line_per_end_of_uplink(service, caplog):
    app = start_server(allow_from=["10.0.0.0/8"])
    device = start_device(app, service.address, reconnect_min=30, reconnect_max=30)
    try:
        wait_for(lambda: device.status()["last_error"], what="the refusal")
        wait_for(lambda: _lines(caplog, "reconnecting to"), what="the backoff")
        about_it = [r for r in caplog.records if r.name == "tcprc.device"
                    and "refused by the server" in r.getMessage()]
        assert len(about_it) == 1 and about_it[0].levelno == logging.WARNING, \
            [r.getMessage() for r in about_it]
    finally:
        device.close()
        app.close()


def test_a_tls_reload_says_what_changed_for_new_and_live_uplinks(caplog):
    from support.tls import crt, shared_pki
    cert, key = crt(shared_pki(), "ca", "localhost")
    app = start_server()
    try:
        app.apply_settings(app.settings._replace(tls_cert=cert, tls_key=key))
        line = _lines(caplog, "TLS is on now")
        assert len(line) == 1 and cert in line[0] and "live sessions keep" in line[0]
        app.apply_settings(app.settings._replace(tls_cert="", tls_key=""))
        assert len(_lines(caplog, "TLS is off now", logging.WARNING)) == 1
    finally:
        app.close()


def test_a_device_without_a_server_says_it_waits_for_tcpremoteconnect(caplog):
    device = DeviceApp(settings("device", server=""))
    device.start()
    try:
        assert len(_lines(caplog, "waiting for TCPRemoteConnect")) == 1
    finally:
        device.close()
