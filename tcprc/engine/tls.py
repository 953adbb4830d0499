"""TLS under one uplink: ssl.SSLObject over two MemoryBIOs, one lock, socket I/O outside it.

Why not ssl.SSLSocket: it refuses sendmsg and flags, and one OpenSSL
connection must not be driven from two threads at once, while the link
thread reads and pump threads write.  Here every call into the SSLObject
holds `_lock`; reading and writing the socket happens outside it, so a pump
blocked on a full uplink never keeps the link thread from decrypting.

Writes: every socket write comes from a sender under the FrameWriter lock
(one at a time), so ciphertext reaches the socket in the order it was made.
A blocking send encrypts under the lock and sendall()s outside it.  The
link thread's send(data, MSG_DONTWAIT) encrypts all of `data` and tries a
non-blocking send; ciphertext the socket does not take is kept in `_unsent`
and the call raises BlockingIOError as if nothing was taken: the writer
keeps the frame and retries it (on writability, or from the next worker),
and that retry, which repeats the same bytes as sockets require, sends the
kept ciphertext instead of encrypting again.  So no ciphertext is left
without an owner that retries it, and `_unsent` holds at most the
ciphertext of one control frame (65539 bytes of plaintext, +22 bytes a
record).  Bytes OpenSSL produces while reading (TLS 1.3 post-handshake
messages) stay in the outgoing BIO, after any ciphertext made before them,
and leave with the next sender's: the link thread never writes them itself.
No session tickets are issued (no resumption is used), so in practice that
is only a KeyUpdate answer, which can wait.

Bulk writes are encrypted a batch at a time straight from the frames'
buffers, never joined: see _write_records.

Reads (link thread only): recv_into decrypts the whole records the socket
has delivered into the caller's buffer, reading the socket again (without
waiting) while it keeps delivering, as a plain socket's read takes all it
holds.  When it stopped because the buffer was full, has_buffered() is
true: the socket may not become readable again for bytes already taken
from it, so the link reads again without waiting for the loop
(Link._on_uplink_buffered).

`ssl` is imported on first use: a plain uplink never loads it (~2 MB of RSS).
"""

import errno
import socket
import threading
import time
from typing import Any, List, NamedTuple, Optional

from ..errors import ConfigError, PeerError
from .buffers import anonymous
from .transport import PlainTransport, Transport, looks_like_tls  # noqa: F401 (re-exported)

_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))   # an int: an IntFlag's | and & run Python code
RECV_CHUNK = 64 * 1024     # ciphertext per socket read
_RECORD = 16 * 1024        # the most plaintext one TLS record carries
_BATCH = 4 * _RECORD       # plaintext encrypted per socket write
LISTEN_FRAME = b"\x00\x00\x04\x00"

# OpenSSL's X509_V_ERR_* codes, by what they mean for an operator.
_UNKNOWN_CA = {2, 18, 19, 20, 21, 27}
_EXPIRED = 10
_NOT_YET_VALID = 9
_WRONG_NAME = {62, 64}    # hostname or IP address mismatch


class TlsError(PeerError, OSError):
    """A TLS failure, one line saying which; an OSError, so the link ends as for any
    uplink error."""

    def __init__(self, message: str):
        super().__init__(errno.EPROTO, message)

    def __str__(self) -> str:
        return self.strerror


def _ssl() -> Any:
    import ssl
    return ssl


# ---- contexts -----------------------------------------------------------------------
class TlsContext(NamedTuple):
    """What a TlsTransport needs besides the socket."""
    context: Any                   # ssl.SSLContext
    server_side: bool
    server_name: Optional[str]     # device: the name the server's certificate must carry
    pin: Optional[bytes]           # device: sha256 of the server's DER certificate


def parse_fingerprint(text: str) -> bytes:
    """"sha256:<64 hex digits>" (colons between the digits allowed) as 32 bytes."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    value = value.replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError("tls_fingerprint %r: want sha256: and 64 hex digits "
                          "(tcprc-pki pin CERT prints it)" % text)
    return bytes.fromhex(value)


def fingerprint(der: bytes) -> str:
    import hashlib   # here: only a pin needs it, and it costs the device ~0.6 MB of RSS
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError("%s %s: cannot read it: %s" % (what, path, exc.strerror or exc)) from None


def _load_chain(context: Any, cert: str, key: str) -> None:
    _readable(cert, "TLS certificate")
    _readable(key, "TLS key")
    try:
        context.load_cert_chain(cert, key)
    except _ssl().SSLError as exc:
        raise ConfigError("TLS certificate %s with key %s: not a PEM certificate and its "
                          "matching key (%s)" % (cert, key, exc.reason or exc)) from None


def _load_ca(context: Any, path: str) -> None:
    _readable(path, "TLS CA file")
    try:
        context.load_verify_locations(cafile=path)
    except _ssl().SSLError as exc:
        raise ConfigError("TLS CA file %s: no PEM certificate in it (%s)"
                          % (path, exc.reason or exc)) from None


def _base(ssl: Any, protocol: Any) -> Any:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0) | ssl.OP_NO_COMPRESSION
    return context


def device_context(server_name: str, ca: Optional[str] = None,
                   fingerprint: Optional[str] = None, cert: Optional[str] = None,
                   key: Optional[str] = None) -> TlsContext:
    """The device's side: the server's certificate is checked against `ca` (the
    system's CAs when None) and must name `server_name`, or, with a
    `fingerprint`, must be exactly the pinned certificate (the pin replaces the
    chain and name checks; it is never skipped).  `cert`/`key`: the device's own."""
    ssl = _ssl()
    if fingerprint and ca:
        raise ConfigError("tls_ca and tls_fingerprint exclude each other: a pin replaces the CA")
    if bool(cert) != bool(key):
        raise ConfigError("tls_cert and tls_key go together: give both or neither")
    context = _base(ssl, ssl.PROTOCOL_TLS_CLIENT)
    pin = None
    if fingerprint:
        pin = parse_fingerprint(fingerprint)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE   # TlsTransport.handshake checks the pin instead
    elif ca:
        _load_ca(context, ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert and key:
        _load_chain(context, cert, key)
    return TlsContext(context, False, server_name, pin)


def server_context(cert: str, key: str, client_ca: Optional[str] = None) -> TlsContext:
    """The server's side: its certificate; with `client_ca`, every device must
    present a certificate signed by it."""
    ssl = _ssl()
    context = _base(ssl, ssl.PROTOCOL_TLS_SERVER)
    if hasattr(context, "num_tickets"):
        context.num_tickets = 0   # no resumption: nothing for the device to process
    _load_chain(context, cert, key)
    if client_ca:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return TlsContext(context, True, None, None)


# ---- the transport --------------------------------------------------------------------
class TlsTransport(Transport):
    """TLS over a connected TCP socket; see the module docstring for the design."""

    can_splice = False
    buffers = True

    def __init__(self, sock: socket.socket, tls: TlsContext, recv_chunk: int = RECV_CHUNK):
        ssl = _ssl()
        self.sock = sock
        self.tls = tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        name: Any = tls.server_name
        if name and name.isascii():
            name = name.encode()   # as is: a str would load the idna codec (~0.3 MB of RSS)
        self.ssl = tls.context.wrap_bio(self._incoming, self._outgoing,
                                        server_side=tls.server_side, server_hostname=name)
        self._lock = threading.Lock()        # every call into self.ssl
        # The C object's methods, one Python frame less per record than SSLObject's.
        sslobj = getattr(self.ssl, "_sslobj", self.ssl)
        self._read, self._write, self._pending = sslobj.read, sslobj.write, sslobj.pending
        self._scratch = memoryview(anonymous(_RECORD))   # a record spanning two parts
        self._held = False                   # plaintext of a partly read record in OpenSSL
        self._unsent = b""                   # senders' (FrameWriter lock): goes first
        self._staged: Optional[bytes] = None  # the plaintext _unsent carries, if refused
        self._chunk = recv_chunk
        self._rbuf = anonymous(recv_chunk)   # RSS only for the pages reads reach
        self._rview = memoryview(self._rbuf)
        self._eof = False                    # the peer closed (TLS or TCP)
        self._more = False                   # the last read stopped on a full buffer
        self.fileno = sock.fileno
        self._errors = (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError,
                        ssl.SSLError)

    # ---- handshake --------------------------------------------------------------
    def handshake(self, timeout: float) -> None:
        """The TLS handshake in the calling thread, within `timeout` seconds;
        raises TlsError saying which check failed."""
        ssl = _ssl()
        peer = "device" if self.tls.server_side else "server"
        deadline = time.monotonic() + timeout
        seen = b""
        old_timeout = self.sock.gettimeout()
        try:
            while True:
                with self._lock:
                    try:
                        self.ssl.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError as exc:
                        out = self._outgoing.read()   # the alert tells the peer why
                        self._send_before(out, deadline)
                        raise TlsError(self._explain(exc)) from None
                    out = self._outgoing.read()
                self._send_before(out, deadline)
                if done:
                    break
                data = self._recv_before(deadline, peer)
                if not seen:
                    seen = data   # a handshake record (0x16) or an alert (0x15) comes first
                    if data[:1] not in (b"\x16", b"\x15"):
                        raise TlsError(self._not_tls(peer, data))
                with self._lock:
                    self._incoming.write(data)
        finally:
            try:
                self.sock.settimeout(old_timeout)
            except OSError:
                pass
        # Records that came with the last handshake bytes: no readability announces them.
        self._more = self._incoming.pending > 0
        if self.tls.pin is not None:
            der = self.ssl.getpeercert(binary_form=True) or b""
            # A certificate is public: a plain comparison gives nothing away.
            if fingerprint(der) != "sha256:" + self.tls.pin.hex():
                raise TlsError("pin mismatch: the server's certificate is %s, tls_fingerprint "
                               "wants sha256:%s" % (fingerprint(der), self.tls.pin.hex()))

    def _send_before(self, data: bytes, deadline: float) -> None:
        if data:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                self.sock.sendall(data)
            except socket.timeout:
                raise TlsError("TLS handshake: the peer took nothing for the handshake "
                               "timeout") from None

    def _recv_before(self, deadline: float, peer: str) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TlsError(self._timed_out(peer))
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(RECV_CHUNK)
        except socket.timeout:
            raise TlsError(self._timed_out(peer)) from None
        except ConnectionError as exc:   # a reset: as much a refusal as a close
            raise TlsError(self._closed_during("reset", exc.strerror)) from None
        if not data:
            raise TlsError(self._closed_during("closed", ""))
        return data

    def _closed_during(self, how: str, detail: str) -> str:
        detail = ": %s" % detail if detail else ""
        if self.tls.server_side:
            return ("the device %s the connection during the TLS handshake%s "
                    "(it may have refused our certificate)" % (how, detail))
        return ("the server %s the connection during the TLS handshake%s "
                "(a plaintext port, or it refused us)" % (how, detail))

    def _timed_out(self, peer: str) -> str:
        if self.tls.server_side:
            return "no TLS handshake from the device within the handshake timeout"
        return ("no TLS answer from the server within the handshake timeout "
                "(it may not speak TLS on that port)")

    @staticmethod
    def _not_tls(peer: str, data: bytes) -> str:
        if data[:4] == LISTEN_FRAME:
            return "the %s does not speak TLS (it sent a tcprc LISTEN frame)" % peer
        return "the %s does not speak TLS (its first bytes: %s)" % (
            peer, " ".join("%02x" % b for b in data[:8]))

    def _explain(self, exc: Any) -> str:
        """One line for a failed handshake or read: which check failed, on which side."""
        ssl = _ssl()
        theirs = "the device's" if self.tls.server_side else "the server's"
        if isinstance(exc, ssl.SSLCertVerificationError):
            code = exc.verify_code
            if code in _UNKNOWN_CA:
                what = "unknown CA (not signed by %s)" % (
                    "tls_client_ca" if self.tls.server_side else "tls_ca or the system's CAs")
            elif code == _EXPIRED:
                what = "expired certificate"
            elif code == _NOT_YET_VALID:
                what = "certificate not yet valid (check the clocks)"
            elif code in _WRONG_NAME:
                what = "wrong name: it is not valid for %s (tls_server_name)" % self.tls.server_name
            else:
                what = exc.verify_message
            return "%s certificate: %s" % (theirs, what)
        reason = (getattr(exc, "reason", None) or "").upper()
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "missing device certificate: the device presented none (tls_client_ca requires one)"
        alerts = {
            "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate (wrong name or not trusted)",
            "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate not trusted",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "missing device certificate (set tls_cert and tls_key)",
        }
        if reason in alerts:
            return "the %s refused our certificate: %s" % (
                "device" if self.tls.server_side else "server", alerts[reason])
        if reason in ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "HTTP_REQUEST"):
            return "the %s does not speak TLS 1.2 or newer (%s)" % (
                "device" if self.tls.server_side else "server", reason.lower())
        return "TLS error: %s" % (exc.reason or exc)

    # ---- the engine's side -------------------------------------------------------
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        want = nbytes or len(view)
        total = self._decrypt(None, view, 0, want) if (self._incoming.pending or self._held) else 0
        # Like a plain socket's read, take what the socket holds now, up to `want`:
        # one read of the link per burst, not one per socket read.  Only the first
        # socket read may wait (the caller's flags); the others never do.
        while total < want and not self._eof:
            try:
                count = self.sock.recv_into(self._rbuf, self._chunk, flags | _DONTWAIT if total else flags)
            except (BlockingIOError, InterruptedError):
                if total:
                    break
                raise
            if not count:
                self._eof = True
                break
            total = self._decrypt(self._rview[:count], view, total, want)
            if total and count < self._chunk:
                break   # the socket was drained: asking again would only cost a system call
        # Left for has_buffered(): records or plaintext the socket will not announce.
        # Short of `want`, all that is left is part of a record: the socket will.
        self._more = total == want and bool(self._incoming.pending or self._held)
        return total

    def _decrypt(self, data: Optional[memoryview], view: memoryview, total: int, want: int) -> int:
        """`data` (ciphertext from the socket) into the incoming BIO, then the
        plaintext of the whole records there into view[total:want]; the new total.

        Stops when the records run out without asking OpenSSL once more (its
        SSLWantReadError costs more than the check): a small frame costs one
        lock and one call into OpenSSL."""
        incoming = self._incoming
        read = self._read
        want_read, zero, eof, error = self._errors
        with self._lock:
            if data is not None:
                incoming.write(data)
            try:
                while total < want:
                    count = read(want - total, view[total:want])
                    if not count:   # EOF, where ssl does not raise for it (3.8)
                        self._eof = True
                        break
                    total += count
                    if total < want and not incoming.pending:
                        break   # a short read ends its record, and no other is here
            except want_read:
                pass
            except (zero, eof):
                self._eof = True
            except error as exc:
                raise TlsError(self._explain(exc)) from None
            self._held = total == want and self._pending() > 0
        return total

    def has_buffered(self) -> bool:
        """Plaintext may be waiting that the socket will not announce."""
        return self._more

    def _seal(self, data: Any) -> None:
        """Encrypt `data`; send the ciphertext once a batch of it is waiting.

        Outside the lock for the send, so the link thread decrypts meanwhile.
        Bytes OpenSSL made while reading (a KeyUpdate answer) wait in the same
        BIO, in order, and leave with these."""
        with self._lock:
            self._write(data)
            if self._outgoing.pending < _BATCH:
                return
            out = self._outgoing.read()
        self.sock.sendall(out)

    def _flush(self) -> None:
        with self._lock:
            out = self._outgoing.read()
        if out:
            self.sock.sendall(out)

    def _write_records(self, parts: Any) -> int:
        """Encrypt `parts` as one byte stream and send it, blocking.

        Whole records are encrypted straight from the parts; only a record that
        spans the end of a part (a frame header and its payload) is copied, into
        `_scratch`.  Ciphertext leaves a batch at a time: no copy of the whole,
        no allocation larger than a batch (a 1 MB join and its 1 MB of records
        cost more in page faults than the encryption)."""
        size = 0
        for part in parts:
            size += len(part)
        if size <= _RECORD:   # one record: the small frames that latency is made of
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            with self._lock:
                self._write(data)
                out = self._outgoing.read()
            self.sock.sendall(out)
            return size
        scratch = self._scratch
        fill = 0
        for part in parts:
            view = memoryview(part)
            end = len(view)
            at = 0
            if fill:
                at = min(_RECORD - fill, end)
                scratch[fill:fill + at] = view[:at]
                fill += at
                if fill < _RECORD:
                    continue
                self._seal(scratch)
                fill = 0
            while end - at >= _RECORD:
                step = min(_BATCH, end - at - (end - at) % _RECORD)
                self._seal(view[at:at + step])
                at += step
            if at < end:
                fill = end - at
                scratch[:fill] = view[at:]
        if fill:
            self._seal(scratch[:fill])
        self._flush()
        return size

    def _encrypt(self, data: Any) -> bytes:
        """Under the lock: `data` as records, after whatever is waiting."""
        with self._lock:
            if len(data):
                self._write(data)
            return self._outgoing.read()

    def _check_repeat(self, data: Any) -> int:
        """A refused send is being repeated: its ciphertext waits in _unsent
        already.  The size of the refused bytes, which `data` must begin with."""
        staged = self._staged
        size = len(staged)
        if len(data) < size or bytes(data[:size]) != staged:
            raise TlsError("TLS transport: a send after BlockingIOError did not repeat "
                           "the refused bytes")
        return size

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._staged is not None:
            data = memoryview(data)[self._check_repeat(data):]
            self._staged = None
        if self._unsent:
            self.sock.sendall(self._unsent)
            self._unsent = b""
        if len(data):
            self._write_records((data,))
        else:
            self._flush()

    def sendmsg(self, parts: List[Any]) -> int:
        if self._staged is not None or self._unsent:   # a refused send's records go first
            data = b"".join(parts)
            self.sendall(data)
            return len(data)
        return self._write_records(parts)

    def send(self, data: Any, flags: int = 0) -> int:
        if not flags & _DONTWAIT:
            self.sendall(data)
            return len(data)
        if self._staged is not None:
            size = self._check_repeat(data)
            self._unsent = self._unsent[self._send_nowait(self._unsent):]
            if self._unsent:
                raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")
            self._staged = None
            return size   # taken now; the caller sends what follows them again
        if self._unsent:   # a blocking send failed part way: the uplink is ending
            raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")
        out = self._encrypt(data)
        sent = self._send_nowait(out)
        if sent < len(out):
            self._unsent = out[sent:]
            self._staged = bytes(data)
            raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")
        return len(data)

    def _send_nowait(self, out: bytes) -> int:
        try:
            return self.sock.send(out, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    def goodbye(self) -> None:
        """close_notify, as trio's aclose sends it: the peer reads a clean end of
        the TLS stream, not a truncation.  Sent without waiting, after any
        ciphertext a refused send left; the peer's own close_notify is not
        awaited.  Nothing is sent once OpenSSL failed (it makes no alert then)."""
        try:
            if self._unsent:
                self._unsent = self._unsent[self._send_nowait(self._unsent):]
                if self._unsent:
                    return   # the socket is full: an alert now would cut a record
            with self._lock:
                try:
                    self.ssl.unwrap()
                except self._errors[-1]:   # SSLWantReadError: the peer's alert not awaited
                    pass
                out = self._outgoing.read()
            if out:
                self._send_nowait(out)
        except OSError:
            pass   # the connection is already gone: nothing to say goodbye to

    shutdown = PlainTransport.shutdown
    close = PlainTransport.close
    tcp_info = PlainTransport.tcp_info
    quick_ack = PlainTransport.quick_ack

    @property
    def version(self) -> str:
        """The negotiated protocol ("TLSv1.3"), for status."""
        with self._lock:
            return self.ssl.version() or ""


def peer_identity(transport: TlsTransport) -> str:
    """The verified peer certificate's CN, else its first DNS name; "" without one
    (the server compares it with the id a device claims)."""
    cert = transport.ssl.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return value
    return ""
