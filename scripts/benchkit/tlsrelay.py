"""The smallest relay the stdlib allows, plain or TLS: one half of a two-relay chain.

Run as a child of scripts/tls-limit, by path (it imports only the stdlib, so
the relay process holds nothing but the interpreter, socket, ssl, threading):

    python tlsrelay.py --to PORT --tls none|socket|object --side entry|exit [--ca F] [--cert F --key F]

It listens on 127.0.0.1 (an ephemeral port, printed on stdout), and for each
connection it accepts it connects to 127.0.0.1:PORT and copies both ways,
one thread per direction, each `recv_into` a preallocated buffer and
`sendall` of a memoryview.  The link between the two relays of a chain (the
entry's outgoing side, the exit's accepted side) is:

- none: plain TCP;
- socket: TLS 1.3 by `ssl.SSLSocket` on the descriptor, blocking: the ssl
  module's fastest path.  Each direction's thread drives the one SSL object
  at the same time as the other (OpenSSL does not allow that); it is the
  ceiling of the ssl module, not a design to deploy;
- object: TLS 1.3 by `ssl.SSLObject` over two `MemoryBIO`s, a lock around
  the SSL calls: what a relay must do when one TLS connection is driven from
  more than one thread (tcprc's transport).

The first handshake's protocol and cipher go to stderr ("cipher: ...").
Stdin closing (the parent done or killed) ends the process.
"""

import argparse
import os
import socket
import ssl
import sys
import threading

LOCAL = "127.0.0.1"
CHUNK = 256 * 1024   # bytes per read, both sides (--chunk)
_reported = threading.Event()


def report_cipher(cipher, version):
    if not _reported.is_set():
        _reported.set()
        # One write: the line must not interleave with another process's.
        sys.stderr.write("cipher: %s %s\n" % (version, cipher[0] if cipher else "?"))
        sys.stderr.flush()


def close_both(a, b):
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src, dst, done):
    """recv_into one buffer, sendall a view of it; the first end (EOF or error) ends both sockets."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
    except (OSError, ValueError):
        pass
    close_both(src, dst)
    done()


class BioLink:
    """One TLS connection as an SSLObject over memory BIOs, socket-like for `pump`.

    `lock` serialises the SSL calls of the two threads; `send_lock`, taken
    before `lock` is let go, keeps the ciphertext on the wire in the order
    OpenSSL made it.
    """

    def __init__(self, sock, context, server_side, server_hostname=None):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.cbuf = bytearray(CHUNK)
        self.cview = memoryview(self.cbuf)
        self.eof = False

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(CHUNK)
                if not data:
                    raise ConnectionError("EOF in the TLS handshake")
                self.incoming.write(data)
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())
        report_cipher(self.obj.cipher(), self.obj.version())

    def _flush_locked(self):
        """Send what OpenSSL wrote (called with `lock` held; lets it go)."""
        if not self.outgoing.pending:
            self.lock.release()
            return
        data = self.outgoing.read()
        self.send_lock.acquire()
        self.lock.release()
        try:
            self.sock.sendall(data)
        finally:
            self.send_lock.release()

    def recv_into(self, buf):
        """Decrypt whatever whole records arrive with each socket read, as much as fits in `buf`."""
        view = memoryview(buf)
        size = len(buf)
        while True:
            self.lock.acquire()
            got = 0
            try:
                while got < size:
                    got += self.obj.read(size - got, view[got:])
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.eof = True
            # OpenSSL may have written while reading (TLS 1.3 post-handshake messages).
            self._flush_locked()
            if got or self.eof:
                return got
            n = self.sock.recv_into(self.cbuf)
            if not n:
                return 0
            with self.lock:
                self.incoming.write(self.cview[:n])

    def sendall(self, data):
        self.lock.acquire()
        try:
            self.obj.write(data)
        except BaseException:
            self.lock.release()
            raise
        self._flush_locked()

    def shutdown(self, how):
        self.sock.shutdown(how)

    def close(self):
        self.sock.close()


def contexts(args):
    if args.tls == "none":
        return None
    if args.side == "exit":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        if hasattr(ctx, "num_tickets"):
            ctx.num_tickets = 0   # as tcprc's server: no resumption tickets to process
    else:
        ctx = ssl.create_default_context(cafile=args.ca)   # verification on, as deployed
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def tls_link(sock, args, ctx):
    """The relay-to-relay side of a connection, as a socket-like object for `pump`."""
    server_side = args.side == "exit"
    hostname = None if server_side else "localhost"
    if args.tls == "socket":
        link = ctx.wrap_socket(sock, server_side=server_side, server_hostname=hostname)
        report_cipher(link.cipher(), link.version())
        return link
    link = BioLink(sock, ctx, server_side, hostname)
    link.handshake()
    return link


def serve_one(conn, args, ctx):
    try:
        out = socket.create_connection((LOCAL, args.to), timeout=10)
        out.settimeout(None)
        for s in (conn, out):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None and args.side == "entry":
            out = tls_link(out, args, ctx)
        elif ctx is not None:
            conn = tls_link(conn, args, ctx)
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        print("relay: %s" % exc, file=sys.stderr, flush=True)
        conn.close()
        return
    left = [2]
    lock = threading.Lock()

    def done():
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            conn.close()
            out.close()
    threading.Thread(target=pump, args=(conn, out, done), daemon=True).start()
    threading.Thread(target=pump, args=(out, conn, done), daemon=True).start()


def main():
    global CHUNK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--to", type=int, required=True)
    p.add_argument("--tls", choices=("none", "socket", "object"), default="none")
    p.add_argument("--side", choices=("entry", "exit"), required=True)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--chunk", type=int, default=CHUNK, help="bytes per read (default %(default)s)")
    args = p.parse_args()
    CHUNK = args.chunk
    ctx = contexts(args)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOCAL, 0))
    srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
    while True:
        conn, _ = srv.accept()
        # The handshake happens in the connection's own thread: a slow peer holds up no other.
        threading.Thread(target=serve_one, args=(conn, args, ctx), daemon=True).start()


if __name__ == "__main__":
    main()
