"""Server and device side together, in this process, over real sockets on 127.0.0.1."""

import hashlib
import os
import socket
import struct
import threading

import pytest

from support import procfs
from support.net import free_port, is_eof, raise_fd_limit, recv_exactly, recv_until_eof
from support.services import Service, pattern
from support.tunnel import Tunnel, settings
from support.waiting import wait_for
from tcprc.server.app import ServerApp


def echo_through(tunnel, payload):
    with tunnel.client() as conn:
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        back = recv_exactly(conn, len(payload))
        sender.join()
    return back


def test_echo_one_line(tunnel):
    assert echo_through(tunnel, b"hello\n") == b"hello\n"


def test_multi_megabyte_upload_integrity():
    sink = Service("sink")
    tunnel = Tunnel(sink.address)
    try:
        data = pattern(12 << 20, seed=3)
        with tunnel.client() as conn:
            conn.sendall(struct.pack("!Q", len(data)) + data)
            assert recv_exactly(conn, 32) == hashlib.sha256(data).digest()
    finally:
        tunnel.close()
        sink.close()


def test_multi_megabyte_download_integrity_then_service_close():
    """Closing case 6: the service sends and closes; the client still gets every byte, then EOF."""
    source = Service("source")
    tunnel = Tunnel(source.address)
    try:
        size = 12 << 20
        with tunnel.client() as conn:
            conn.sendall(struct.pack("!Q", size))
            got = recv_until_eof(conn)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
        wait_for(lambda: tunnel.server.status()["clients"] == 0, what="server stream closed")
    finally:
        tunnel.close()
        source.close()


def test_both_ways_at_once_integrity(tunnel):
    data = os.urandom(8 << 20)
    assert hashlib.sha256(echo_through(tunnel, data)).digest() == hashlib.sha256(data).digest()


def test_fifty_concurrent_clients_keep_their_bytes_apart(tunnel):
    results = {}

    def client(n):
        data = pattern(300_000 + n * 997, seed=n)
        results[n] = hashlib.sha256(echo_through(tunnel, data)).digest() == hashlib.sha256(data).digest()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 50 and all(results.values())


def test_client_close_closes_service_socket(tunnel, service, caplog):
    """Closing case 7: the client hangs up; the device closes the service socket."""
    conn = tunnel.client()
    assert echo_through(tunnel, b"x") == b"x"
    conn.sendall(b"ping")
    assert recv_exactly(conn, 4) == b"ping"
    before = service.ended
    conn.close()
    wait_for(lambda: service.ended >= before + 1, what="service socket closed")
    wait_for(lambda: tunnel.device.status()["clients"] == 0 and tunnel.server.status()["clients"] == 0,
             what="both stream tables empty")
    # One line per closed client on each side, with what it carried.
    wait_for(lambda: caplog.text.count("(4 bytes to the peer, 4 from it)") == 2, what="close lines")


def test_service_close_closes_client(service):
    """Closing case 6 with the echo service: the device's service socket closes, the client sees EOF."""
    tunnel = Tunnel(service.address)
    try:
        conn = tunnel.client()
        conn.sendall(b"abc")
        assert recv_exactly(conn, 3) == b"abc"
        wait_for(lambda: service.open, what="service connection")
        with service.lock:
            for s in service.open:
                s.shutdown(socket.SHUT_RDWR)
        assert is_eof(conn)
        conn.close()
    finally:
        tunnel.close()


def test_uplink_loss_on_server_side_closes_everything_and_device_reconnects(service):
    tunnel = Tunnel(service.address)
    try:
        port = tunnel.server.listen_address[1]
        clients = [tunnel.client() for _ in range(3)]
        for c in clients:
            c.sendall(b"hi")
            assert recv_exactly(c, 2) == b"hi"
        wait_for(lambda: len(service.open) == 3, what="3 service connections")
        tunnel.server.close()
        for c in clients:
            assert is_eof(c), "client socket must be closed when the uplink goes"
            c.close()
        wait_for(lambda: not service.open, what="device closed every service socket")
        # A new server on the same port: the device finds it by itself.
        tunnel.server = ServerApp(settings("server", listen="127.0.0.1:%d" % port, host="127.0.0.1:0"))
        tunnel.server.start()
        wait_for(lambda: tunnel.server.host_address, what="device reconnected", timeout=15)
        assert echo_through(tunnel, b"again") == b"again"
        assert tunnel.device.status()["state"] == "up"
    finally:
        tunnel.close()


def test_uplink_loss_on_device_side_closes_client_sockets(service):
    tunnel = Tunnel(service.address)
    try:
        conn = tunnel.client()
        conn.sendall(b"hi")
        assert recv_exactly(conn, 2) == b"hi"
        tunnel.device.disconnect()
        assert is_eof(conn)
        conn.close()
        wait_for(lambda: not service.open, what="service sockets closed")
        wait_for(lambda: tunnel.server.host_address is None, what="host port closed")
        wait_for(lambda: tunnel.device.status()["state"] == "idle", what="device idle")
    finally:
        tunnel.close()


def test_device_backs_off_while_server_is_down(service):
    dead = "127.0.0.1:%d" % free_port()
    from tcprc.device.app import DeviceApp
    device = DeviceApp(settings("device", server=dead, local="%s:%d" % service.address,
                                reconnect_min=0.05, reconnect_max=0.2))
    device.start()
    try:
        wait_for(lambda: device.status()["state"] == "backoff", what="backoff state")
        assert "connect to %s failed" % dead in device.status()["last_error"]
    finally:
        device.close()


def test_backoff_doubles_to_the_cap_with_jitter():
    from tcprc.device.app import Backoff
    backoff = Backoff(1.0, 60.0)
    delays = [backoff.next_delay() for _ in range(10)]
    for n, delay in enumerate(delays):
        full = min(60.0, 2.0 ** n)
        assert full / 2 <= delay <= full
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_255_clients_then_the_256th_is_refused_cleanly(tunnel, caplog):
    raise_fd_limit(4096)
    clients = []
    try:
        for n in range(255):
            conn = tunnel.client()
            conn.sendall(b"%03d" % n)
            clients.append(conn)
        for n, conn in enumerate(clients):
            assert recv_exactly(conn, 3) == b"%03d" % n
        assert tunnel.server.status()["clients"] == 255
        extra = tunnel.client()
        assert is_eof(extra), "the 256th client is closed at once"
        extra.close()
        assert "all 255 client ids of this tunnel are in use" in caplog.text
        for n, conn in enumerate(clients):
            conn.sendall(b"again%03d" % n)
            assert recv_exactly(conn, 8) == b"again%03d" % n
        # One leaves, a new one gets in.
        clients.pop().close()
        wait_for(lambda: tunnel.server.status()["clients"] == 254, what="a free id")
        late = tunnel.client()
        clients.append(late)
        late.sendall(b"late")
        assert recv_exactly(late, 4) == b"late"
    finally:
        for conn in clients:
            conn.close()


def test_ids_are_round_robin_and_not_reused_before_close():
    from tcprc.server.ids import ClientIds
    ids = ClientIds()
    in_use = {}
    first = [ids.allocate(in_use) for _ in range(3)]
    assert first == [1, 2, 3]
    in_use = {2: True}
    assert ids.allocate(in_use) == 4          # 1 is free, but the next in turn comes first
    in_use = {n: True for n in range(1, 256)}
    assert ids.allocate(in_use) is None
    del in_use[200]
    assert ids.allocate(in_use) == 200


def test_slow_client_is_closed_after_stall_and_others_carry_on(caplog):
    """Legacy sessions have no flow control of their own: stall_timeout is theirs."""
    source = Service("source")
    tunnel = Tunnel(source.address, server_keys={"stream_buffer": 65536, "stall_timeout": 0.5},
                    device_keys={"protocol": "legacy"})
    try:
        slow = tunnel.client()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(struct.pack("!Q", 64 << 20))     # asks for 64 MB and never reads
        wait_for(lambda: source.accepted == 1, what="the download to start")
        wait_for(lambda: "read nothing for" in caplog.text, timeout=20,
                 what="the slow client to be closed")
        assert tunnel.server.status()["clients"] == 0
        # The tunnel moves again: another client gets a full download.
        with tunnel.client() as conn:
            conn.sendall(struct.pack("!Q", 1 << 20))
            assert recv_until_eof(conn) == pattern(1 << 20)
        slow.close()
    finally:
        tunnel.close()
        source.close()


@pytest.mark.memory
def test_no_thread_or_fd_leak_after_500_connect_close_cycles(tunnel, service):
    echo_through(tunnel, b"warm-up")
    wait_for(lambda: tunnel.server.status()["clients"] == 0, what="warm-up closed")
    wait_for(lambda: not service.open, what="service idle")
    threads, fds = procfs.threads(os.getpid()), procfs.open_fds(os.getpid())
    for n in range(500):
        with tunnel.client() as conn:
            if n % 2:
                conn.sendall(b"x")
                assert recv_exactly(conn, 1) == b"x"
    wait_for(lambda: tunnel.server.status()["clients"] == 0 and tunnel.device.status()["clients"] == 0,
             what="all streams closed")
    wait_for(lambda: procfs.threads(os.getpid()) <= threads, timeout=15,
             what="threads back to %d (now %d)" % (threads, procfs.threads(os.getpid())))
    wait_for(lambda: procfs.open_fds(os.getpid()) <= fds, timeout=15,
             what="fds back to %d (now %d)" % (fds, procfs.open_fds(os.getpid())))


@pytest.mark.memory
def test_no_leak_after_tunnel_closes(service):
    threads, fds = procfs.threads(os.getpid()), procfs.open_fds(os.getpid())
    tunnel = Tunnel(service.address)
    clients = [tunnel.client() for _ in range(20)]
    for c in clients:
        c.sendall(b"y")
        assert recv_exactly(c, 1) == b"y"
    tunnel.close()
    for c in clients:
        c.close()
    wait_for(lambda: not service.open, what="service sockets closed")
    # the service's own per-connection threads end too
    wait_for(lambda: procfs.threads(os.getpid()) <= threads, timeout=15,
             what="threads back to %d (now %d)" % (threads, procfs.threads(os.getpid())))
    wait_for(lambda: procfs.open_fds(os.getpid()) <= fds, timeout=15, what="fds back")


def test_status_counts_bytes_and_clients(tunnel):
    conn = tunnel.client()
    conn.sendall(b"12345")
    assert recv_exactly(conn, 5) == b"12345"
    # The pump counts a frame once its send returned, which may be after the echo arrived.
    status = wait_for(lambda: (lambda st: st if st["bytes_up"] >= 5 else None)(tunnel.device.status()),
                      what="bytes counted")
    assert status["state"] == "up" and status["clients"] == 1
    assert status["bytes_down"] >= 5
    assert status["uptime"] is not None and status["uptime"] >= 0
    server = tunnel.server.status()
    assert server["state"] == "up" and server["clients"] == 1 and server["host"]
    conn.close()


def test_device_settings_reload_keeps_streams_when_unchanged(tunnel, service):
    conn = tunnel.client()
    conn.sendall(b"a")
    assert recv_exactly(conn, 1) == b"a"
    same = tunnel.device.settings
    tunnel.device.apply_settings(same)
    conn.sendall(b"b")
    assert recv_exactly(conn, 1) == b"b"
    conn.close()


def test_uplink_has_the_configured_keepalive_and_timeouts(service):
    keys = dict(keepalive_idle=7, keepalive_interval=3, keepalive_count=4, send_timeout=9.0)
    tunnel = Tunnel(service.address, server_keys=keys, device_keys=keys)
    try:
        uplinks = [wait_for(lambda: tunnel.device._link, what="device uplink").sock,
                   wait_for(lambda: tunnel.server.link_on(), what="server uplink").sock]
        for sock in uplinks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000
    finally:
        tunnel.close()
