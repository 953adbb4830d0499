"""The fast paths of the pumps (what they buy, measured on real agents)."""

import socket

from conftest import Service, recv_exactly, start_tunnel, wait_for


def _proc_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def test_idle_streams_cost_little_device_memory(agents):
    # Pump buffers are mapped lazily: an open stream that moved a few bytes
    # costs its thread stack and a page, not a 64 KB buffer.
    svc = Service("echo")
    try:
        server, device, host = start_tunnel(agents, svc.address)
        warm = socket.create_connection(host, timeout=10)
        warm.sendall(b"w")
        assert recv_exactly(warm, 1) == b"w"
        warm.close()
        wait_for(lambda: svc.ended == 1, what="warm-up stream closed")
        before = _proc_rss_kb(device.pid)
        socks = [socket.create_connection(host, timeout=10) for _ in range(100)]
        try:
            for s in socks:
                s.sendall(b"x" * 64)
            for s in socks:
                assert recv_exactly(s, 64) == b"x" * 64
            per_stream = (_proc_rss_kb(device.pid) - before) / 100.0
        finally:
            for s in socks:
                s.close()
        assert per_stream < 40, "%.1f KB per open stream" % per_stream
    finally:
        svc.close()
