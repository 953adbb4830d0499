"""Nothing a setting, a bug or a resource limit does may leave a live process with a
dead tunnel: every long-lived thread has a fault barrier, a thread that cannot
start refuses one client, and whatever is left over is seen by `health`.

Faults are injected into the real code paths (a method made to raise once,
thread starts made to fail as a thread limit makes them); the network, the
apps and their threads are real.
"""

import _thread
import logging
import os
import socket
import threading
import time

import pytest

from support.net import recv_exactly, recv_until_eof
from support.tunnel import Tunnel, settings, start_device, start_server
from support.waiting import wait_for
from tcprc.device.app import DeviceApp
from tcprc.device.link import DeviceRole
from tcprc.engine import pump
from tcprc.engine.liveness import Liveness
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config
from tcprc.server.app import ServerApp


def _round_trip(host, data=b"still carried"):
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(data)
        assert recv_exactly(conn, len(data)) == data


def _shared_record(app):
    """The row of the session on [server] host ({} while none is up)."""
    return next((row for row in app.devices() if row["id"] == ":legacy"), {})


class _Once:
    """Make `owner.name` raise `error` on its next call (then behave again)."""

    def __init__(self, monkeypatch, owner, name, error):
        self.calls = 0
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                raise error
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture
def fail_thread_starts(monkeypatch):
    """fail(predicate): thread starts for which predicate() is true fail as they do
    under a thread limit (RuntimeError: can't start new thread); returns a switch."""
    switch = {"on": True}

    def install(predicate):
        real = _thread.start_new_thread

        def start_new_thread(function, args, kwargs={}):
            if switch["on"] and predicate():
                raise RuntimeError("can't start new thread")
            return real(function, args, kwargs)
        monkeypatch.setattr(pump._thread, "start_new_thread", start_new_thread)
        real_start = threading.Thread.start

        def start(self):
            if switch["on"] and predicate(self):
                raise RuntimeError("can't start new thread")
            return real_start(self)
        monkeypatch.setattr(threading.Thread, "start", start)
        return switch
    return install


# ---- names -------------------------------------------------------------------------

def test_a_server_name_no_resolver_takes_is_a_resolution_error_and_the_device_recovers(service):
    """`config set device.server 'a..ä:9000'` used to end the supervisor thread
    (UnicodeError from the idna codec); a good server then changed nothing."""
    server = start_server()
    device = start_device(server, service.address, server="a..\u00e4:9000")
    try:
        wait_for(lambda: "not a valid host name" in device.status()["last_error"],
                 what="the resolution error")
        assert device.status()["health"] == "ok"
        good = device.settings._replace(server=("%s:%d" % server.listen_address,))
        device.apply_settings(good)
        wait_for(lambda: server.host_address, what="the tunnel after a good server")
        _round_trip(server.host_address)
    finally:
        device.close()
        server.close()


# ---- threads that cannot start -------------------------------------------------------

def test_the_device_refuses_a_stream_whose_thread_cannot_start_and_keeps_its_uplink(
        service, fail_thread_starts, caplog):
    tunnel = Tunnel(service.address)
    try:
        sessions = _shared_record(tunnel.server)["sessions"]
        switch = fail_thread_starts(
            lambda *thread: not thread and threading.current_thread().name == "tcprc-device")
        for _ in range(3):
            with socket.create_connection(tunnel.host, timeout=10) as conn:
                conn.sendall(b"no thread for me")
                assert recv_until_eof(conn) == b""   # refused: closed, nothing carried
        wait_for(lambda: caplog.text.count("cannot start a thread") >= 3,
                 what="the server's lines naming the device's reason")
        assert "cannot start its thread" in caplog.text   # the device's own line
        switch["on"] = False
        _round_trip(tunnel.host)
        assert _shared_record(tunnel.server)["sessions"] == sessions   # the same uplink
        assert tunnel.device.status()["health"] == "ok"
    finally:
        tunnel.close()


def test_the_server_refuses_a_client_whose_thread_cannot_start_and_counts_it(
        service, fail_thread_starts):
    tunnel = Tunnel(service.address)
    try:
        switch = fail_thread_starts(
            lambda *thread: not thread and threading.current_thread().name == "tcprc-uplink")
        with socket.create_connection(tunnel.host, timeout=10) as conn:
            assert recv_until_eof(conn) == b""
        wait_for(lambda: _shared_record(tunnel.server)["refused_clients"] == 1,
                 what="the refusal counted")
        switch["on"] = False
        _round_trip(tunnel.host)
    finally:
        tunnel.close()


def test_the_uplink_acceptor_survives_an_uplink_whose_thread_cannot_start(
        service, fail_thread_starts, caplog):
    server = start_server()
    switch = fail_thread_starts(lambda *thread: thread and thread[0].name == "tcprc-uplink")
    device = start_device(server, service.address)
    try:
        wait_for(lambda: "cannot start its thread" in caplog.text, what="the refusal")
        assert server.uplinks_refused >= 1 and server.host_address is None
        assert server.health() == []
        switch["on"] = False
        wait_for(lambda: server.host_address, what="the device, once threads start again")
        _round_trip(server.host_address)
    finally:
        device.close()
        server.close()


# ---- bugs ----------------------------------------------------------------------------

def _internal_errors(caplog):
    return [r for r in caplog.records if "internal error" in r.getMessage()
            and r.levelno == logging.ERROR]


def test_a_bug_in_a_link_callback_ends_that_uplink_once_and_the_device_redials(
        service, monkeypatch, caplog):
    tunnel = Tunnel(service.address)
    try:
        sessions = _shared_record(tunnel.server)["sessions"]
        _Once(monkeypatch, DeviceRole, "open_local", KeyError("injected"))
        with socket.create_connection(tunnel.host, timeout=10) as conn:
            assert recv_until_eof(conn) == b""   # its uplink ended under it
        wait_for(lambda: _shared_record(tunnel.server).get("sessions", 0) > sessions
                 and tunnel.server.host_address, what="the device back")
        _round_trip(tunnel.host)
        errors = _internal_errors(caplog)
        assert len(errors) == 1 and errors[0].exc_info is not None   # once, with its traceback
        assert "KeyError" in tunnel.device.status()["last_error"]
    finally:
        tunnel.close()


def test_a_bug_in_a_pump_ends_the_uplink_once_and_the_device_redials(
        service, monkeypatch, caplog):
    tunnel = Tunnel(service.address)
    try:
        sessions = _shared_record(tunnel.server)["sessions"]
        _Once(monkeypatch, pump, "_copy_with_credit", ZeroDivisionError("injected"))
        with socket.create_connection(tunnel.host, timeout=10) as conn:
            conn.sendall(b"x")
            assert recv_until_eof(conn) == b""
        wait_for(lambda: _shared_record(tunnel.server).get("sessions", 0) > sessions
                 and tunnel.server.host_address, what="the device back")
        _round_trip(tunnel.host)
        errors = _internal_errors(caplog)
        assert len(errors) == 1 and "pump" in errors[0].getMessage()
    finally:
        tunnel.close()


def test_a_bug_in_the_supervisor_is_logged_once_and_the_device_dials_again(
        service, monkeypatch, caplog):
    server = start_server()
    _Once(monkeypatch, DeviceApp, "_serve_once", AttributeError("injected"))
    device = start_device(server, service.address)
    try:
        wait_for(lambda: server.host_address, what="the device after the failed attempt")
        _round_trip(server.host_address)
        errors = _internal_errors(caplog)
        assert len(errors) == 1 and errors[0].exc_info is not None
        assert device.status()["health"] == "ok"
    finally:
        device.close()
        server.close()


def test_a_bug_in_the_uplink_acceptor_is_logged_and_it_carries_on(
        service, monkeypatch, caplog):
    server = start_server()
    _Once(monkeypatch, ServerApp, "_make_room", RuntimeError("injected"))
    device = start_device(server, service.address)
    try:
        wait_for(lambda: server.host_address, timeout=15, what="the device on a later dial")
        _round_trip(server.host_address)
        assert len(_internal_errors(caplog)) == 1 and server.health() == []
    finally:
        device.close()
        server.close()


# ---- liveness ------------------------------------------------------------------------

def test_liveness_names_a_thread_that_ended_or_stopped_beating():
    live = Liveness()
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    live.watch("gone", done)
    live.watch("slow", limit=5.0)   # this thread
    live.watch("fine")
    now = time.monotonic()
    live.beat("fine")
    assert live.problems(now) == ["thread gone has ended"]
    problems = live.problems(now + 6.0)
    assert "thread gone has ended" in problems
    assert any(p.startswith("thread slow made no progress for 6 s") for p in problems)
    assert not any("fine" in p for p in problems)
    live.forget("gone")
    live.forget("slow")
    assert live.problems(now + 6.0) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_answers_unhealthy_when_the_supervisor_is_gone(service, monkeypatch):
    device = DeviceApp(settings("device", server="", local="%s:%d" % service.address))
    _Once(monkeypatch, DeviceApp, "_beat_wait", SystemExit())   # past every barrier
    device.start()
    parser = CommandParser(device, build_config("device", {}, "t"))
    try:
        wait_for(lambda: device.health(), what="the dead supervisor seen")
        answer = parser.execute("health")
        assert len(answer) == 1 and answer[0].startswith("ERROR unhealthy: thread tcprc-device")
        assert "has ended" in device.status()["health"]
    finally:
        device.close()


# ---- descriptors on every exit path -----------------------------------------------------

@pytest.mark.e2e
def test_stalled_tls_handshakes_give_their_descriptors_back(agents):
    """300 connections from 50 addresses that start a TLS handshake and stall: every
    link they cost (its socket, its loop's epoll and wake-up pair) is given back
    when they are dropped, not at some garbage collection."""
    from support.net import free_port, listening, raise_fd_limit
    from support.procfs import open_fds
    from support.tls import crt, shared_pki
    cert, key = crt(shared_pki(), "ca", "localhost")
    listen = free_port()
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, config=(
        '[server]\ntls_cert = "%s"\ntls_key = "%s"\nlisten_timeout = 2.0\n' % (cert, key)))
    # Counted once it runs whole: its control socket opens after the uplink port.
    wait_for(lambda: listening(listen) and os.path.exists(server.control_socket),
             what="the server")
    raise_fd_limit(600)
    before = open_fds(server.pid)
    stalled = []
    try:
        for n in range(300):
            sock = socket.socket()
            sock.bind(("127.0.0.%d" % (2 + n % 50), 0))
            sock.connect(("127.0.0.1", listen))
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")   # a ClientHello's first bytes, no more
            stalled.append(sock)
        wait_for(lambda: open_fds(server.pid) <= before + 10, timeout=30,
                 what="the stalled handshakes' descriptors back (listen_timeout 2 s)")
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: open_fds(server.pid) <= before, timeout=30, what="back to the start")
    assert server.poll() is None


# ---- refusals say so on the device ------------------------------------------------------

def test_a_device_turned_away_by_allow_from_says_it_was_refused(service):
    server = start_server(allow_from=["10.0.0.0/8"])
    device = start_device(server, service.address)
    try:
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert error.startswith("refused by the server"), error
    finally:
        device.close()
        server.close()


def test_a_legacy_device_turned_away_by_legacy_false_says_why(service):
    server = start_server(legacy=False, listen_timeout=0.5)
    device = start_device(server, service.address, protocol="legacy")
    try:
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert error.startswith("the server refused this legacy device: identity required"), error
    finally:
        device.close()
        server.close()
