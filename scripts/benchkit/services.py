"""The services every variant reaches: a built-in echo, and iperf3 -s or a built-in generator."""

import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Optional

from .base import BENCH, LOCAL, BenchError, Procs, free_port, listening, read_line, recv_exact, wait_for


# Run as child processes: `bench --serve echo|gen`.
def serve(kind: str) -> int:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOCAL, 0))
    srv.listen(512)
    print(srv.getsockname()[1], flush=True)
    # The parent closes our stdin when it is done; that ends us even if it was killed.
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
    if kind == "echo":
        _serve_echo(srv)
    else:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_gen_conn, args=(conn,), daemon=True).start()
    return 0


def _serve_echo(srv: socket.socket) -> None:
    sel = selectors.DefaultSelector()
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    buf = bytearray(65536)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is srv:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                n = sock.recv_into(buf)
                if n:
                    sock.sendall(memoryview(buf)[:n])
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


# Mode b"S": we count what arrives for d seconds and answer the byte count (the
# legacy protocol has no half-close, so the sender cannot just shut down);
# mode b"R": we send for d seconds, then close; mode b"N": we send d bytes, then
# close (a download of a known size, to tell a completed one from a cut one).
GEN_HEAD = struct.Struct("!cd")


def _gen_conn(conn: socket.socket) -> None:
    try:
        mode, seconds = GEN_HEAD.unpack(recv_exact(conn, GEN_HEAD.size))
        buf = bytearray(256 * 1024)
        if mode == b"S":
            total = conn.recv_into(buf)
            end = time.monotonic() + seconds
            while total and time.monotonic() < end:
                total += conn.recv_into(buf)
            conn.sendall(struct.pack("!Qd", total, seconds))
            while conn.recv_into(buf):
                pass
        elif mode == b"N":
            left = int(seconds)
            while left > 0:
                left -= conn.send(memoryview(buf)[:min(left, len(buf))])
        else:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(buf)
    except (OSError, BenchError):
        pass
    finally:
        conn.close()


class Services:
    """The targets every variant reaches: echo, and iperf3 -s or the built-in generator."""

    def __init__(self, procs: Procs, use_iperf3: bool):
        self.procs = procs
        self.echo_port = self._builtin("echo")
        # The built-in generator runs always: the paused-client row needs its
        # downloads of a known size, whichever tool measures the bulk rows.
        self.gen_port = self._builtin("gen")
        self.iperf3 = use_iperf3
        self._iperf_proc: Optional[subprocess.Popen] = None
        if use_iperf3:
            self.bulk_port = free_port()
            self.restart_iperf3()
        else:
            self.bulk_port = self.gen_port

    def _builtin(self, kind: str) -> int:
        proc = self.procs.start([sys.executable, BENCH, "--serve", kind],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return int(read_line(proc, 10))

    def restart_iperf3(self) -> None:
        """(Re)start iperf3 -s on the same port: a failed test can leave it stuck."""
        if self._iperf_proc is not None:
            self.procs.stop(self._iperf_proc)
            wait_for(lambda: not listening(self.bulk_port), 5, "iperf3 -s to go away")
        self._iperf_proc = self.procs.start(
            ["iperf3", "-s", "-B", LOCAL, "-p", str(self.bulk_port)])
        wait_for(lambda: listening(self.bulk_port) or self._iperf_proc.poll() is not None,
                 10, "iperf3 -s to listen")
        if self._iperf_proc.poll() is not None:
            raise BenchError("iperf3 -s exited with status %d" % self._iperf_proc.returncode)
