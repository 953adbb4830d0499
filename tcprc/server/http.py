"""[server] http: the fleet's status page (/), /api/devices (JSON) and /metrics
(Prometheus text format).

What a request may cost is bounded: its head (httphead: 8 KB a line, 32 KB,
64 lines, 10 s for all of it), the requests served at once (MAX_REQUESTS,
MAX_PER_SOURCE from one address: over it the accept thread answers 503 and
closes, no thread is started) and the time to send the answer.  A client
that hangs up costs no traceback, at most a rate-limited debug line.

Who may ask: the Host header must name this server (the address of
[server] http as bound, the IP the client reached, `localhost` on loopback,
or a name in http_hosts), so a web page that rebinds its own DNS name to
this address cannot read it through the operator's browser (421 otherwise).
With http_token set, every path needs `Authorization: Bearer TOKEN` or HTTP
basic auth with the token as password (a browser asks for it), compared in
constant time; /metrics too unless http_metrics_open.  Everything from the
table is escaped: the page builds its rows with textContent, the metrics
escape label values.
"""

import base64
import binascii
import hashlib
import hmac
import json
import logging
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..addr import format_hostport, parse_hostport, source_key
from ..engine.ratelog import LimitedLog, SourceLog
from .httphead import HeadError, Request, parse_head, read_head
from .page import CSP, page

log = logging.getLogger("tcprc.server")

MAX_REQUESTS = 32       # requests served at once
MAX_PER_SOURCE = 8      # of those from one source (an IPv4 address, an IPv6 /64)
HEAD_TIMEOUT = 10.0     # seconds for a request's whole head
SEND_TIMEOUT = 30.0     # seconds for a whole answer (a 1000-device table is ~400 KB)
DRAIN = 1.0             # seconds an error answer waits for the client to read it
REFUSED_MAX = 64        # refused connections waiting for their 503 to be read

_LOOPBACK = ("127.", "::1", "::ffff:127.")
_ANY = ("", "0.0.0.0", "::")

# (name, type, help, the row's key): one sample per device and metric.
_METRICS = (
    ("tcprc_session_up", "gauge", "1 while the device's session is up", "up"),
    ("tcprc_open_streams", "gauge", "client streams open on the device's session", "streams"),
    ("tcprc_bytes_from_device_total", "counter", "bytes received from the device",
     "bytes_up"),
    ("tcprc_bytes_to_device_total", "counter", "bytes sent to the device", "bytes_down"),
    ("tcprc_sessions_started_total", "counter", "sessions the device started", "sessions"),
    ("tcprc_auth_failures_total", "counter", "failed authentications as the device",
     "auth_failures"),
    ("tcprc_refused_clients_total", "counter", "clients refused by the device's limits",
     "refused_clients"),
    ("tcprc_heartbeat_rtt_seconds", "gauge", "smoothed heartbeat round trip of the session",
     "rtt"),
)


def label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


# A cluster's server adds these (the rows carry "node" then).
_CLUSTER_METRICS = (
    ("tcprc_forwarded_clients_total", "counter",
     "clients of the device forwarded to the node holding it", "forwarded_clients"),
    ("tcprc_cluster_fights_total", "counter",
     "times the device's id answered on this node and another at once (a cloned identity)",
     "fights"),
)


def metrics_text(rows: List[Dict[str, Any]], auth_failures: int,
                 cluster: Optional[Dict[str, int]] = None) -> str:
    """`cluster`: tcprc_cluster_nodes_up and tcprc_cluster_registry_up, with [cluster]."""
    lines = []
    for name, kind, text, key in _METRICS + (_CLUSTER_METRICS if cluster is not None else ()):
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for row in rows:
            value = 1 if key == "up" and row["state"] == "up" else row.get(key, 0)
            if value is None:
                continue   # no RTT known: no sample
            lines.append("%s{device=\"%s\"} %s" % (name, label(row["id"]), _number(value)))
    lines += ["# HELP tcprc_server_auth_failures_total failed authentications from any source",
              "# TYPE tcprc_server_auth_failures_total counter",
              "tcprc_server_auth_failures_total %d" % auth_failures]
    if cluster is not None:
        lines += ["# HELP tcprc_cluster_nodes_up servers of the cluster whose lease lives",
                  "# TYPE tcprc_cluster_nodes_up gauge",
                  "tcprc_cluster_nodes_up %d" % cluster["nodes_up"],
                  "# HELP tcprc_cluster_registry_up 1 while etcd answers this server",
                  "# TYPE tcprc_cluster_registry_up gauge",
                  "tcprc_cluster_registry_up %d" % cluster["registry_up"]]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


# ---- who may ask ----------------------------------------------------------------------

def _canonical(name: str) -> str:
    """A host name lower-case without a trailing dot; an IP literal in one spelling
    (an IPv4-mapped IPv6 address as IPv4)."""
    name = name.lower().rstrip(".").partition("%")[0]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            text = socket.inet_ntop(family, socket.inet_pton(family, name))
        except (OSError, ValueError):
            continue
        return text[7:] if text.startswith("::ffff:") and "." in text else text
    return name


def split_host(value: str) -> Tuple[str, Optional[int]]:
    """A Host header (or an http_hosts entry): (canonical name, port or None).
    ValueError if it is no host[:port]."""
    value = value.strip()
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError("unclosed [")
        name, rest = value[1:close], value[close + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ]")
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    else:
        name, port_text = value, None
    if not name or any(c.isspace() or c in "/@?#\\" for c in name):
        raise ValueError("not a host name")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("bad port")
        port = int(port_text)
    return _canonical(name), port


class Access(NamedTuple):
    """What the settings say about who may see what."""
    token: Optional[bytes]                       # http_token; None: no login
    metrics_open: bool                           # /metrics without the token
    hosts: Tuple[Tuple[str, Optional[int]], ...]  # http_hosts, split


def access_of(settings: Any) -> Access:
    token = settings.http_token.reveal() if settings.http_token is not None else None
    return Access(token, settings.http_metrics_open,
                  tuple(split_host(entry) for entry in settings.http_hosts))


def credentials_ok(header: Optional[str], token: bytes) -> Optional[bool]:
    """Authorization `header` against `token`: None when it gives none, else whether
    it is `Bearer TOKEN` or basic auth with TOKEN as password (any user name).
    Compared as SHA-256 digests in constant time (not even the length shows)."""
    if not header:
        return None
    scheme, _, given = header.strip().partition(" ")
    secret = given.strip().encode("latin-1", "replace")
    if scheme.lower() == "basic":
        try:
            secret = base64.b64decode(secret, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(secret).digest(), hashlib.sha256(token).digest())


# ---- the listener -----------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 414: "URI Too Long",
            421: "Misdirected Request", 431: "Request Header Fields Too Large",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 32\r\nRetry-After: 2\r\nConnection: close\r\n\r\n"
         b"busy: too many requests at once\n")


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.site.serve(self.request, self.client_address)   # type: ignore[attr-defined]


class _Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Counts the requests in service, in all and per source; over a limit the
    accept thread itself answers 503 (a non-blocking send into an empty socket
    buffer) and closes the connection a moment later, when its 503 has been read."""

    daemon_threads = True
    block_on_close = False      # close() must not wait for stalled clients
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], family: int, site: "StatusServer"):
        self.address_family = family
        self.site = site
        self._lock = threading.Lock()
        self._active = 0
        self._per_source: Dict[Any, int] = {}
        self._refused: List[Tuple[float, socket.socket]] = []
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        key = source_key(client_address[0])
        with self._lock:
            if self._active >= self.site.max_requests:
                over = "max %d requests at once" % self.site.max_requests
            elif self._per_source.get(key, 0) >= self.site.max_per_source:
                over = "max %d requests at once from one source" % self.site.max_per_source
            else:
                over = ""
                self._active += 1
                self._per_source[key] = self._per_source.get(key, 0) + 1
        if over:
            self._refuse(request, client_address, key, over)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:   # no thread to be had
            self._done(key)
            self._refuse(request, client_address, key, str(exc))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(source_key(client_address[0]))

    def _done(self, key: Any) -> None:
        with self._lock:
            self._active -= 1
            left = self._per_source[key] - 1
            if left:
                self._per_source[key] = left
            else:
                del self._per_source[key]

    def _refuse(self, sock: socket.socket, peer: Any, key: Any, why: str) -> None:
        self.site.source_log.warning(key, "status page: %s answered 503: %s",
                                     format_hostport(*peer[:2]), why)
        try:
            sock.setblocking(False)
            sock.send(_BUSY)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self._refused.append((time.monotonic() + DRAIN, sock))
        if len(self._refused) > REFUSED_MAX:
            self._refused.pop(0)[1].close()

    def service_actions(self) -> None:
        """Between accepts: close the refused connections whose 503 had its time."""
        now = time.monotonic()
        while self._refused and self._refused[0][0] <= now:
            self._refused.pop(0)[1].close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A bug in serving one request (hang-ups never get here): one line, no traceback."""
        self.site.errors.warning("status page: request from %s failed: %r",
                                 format_hostport(*client_address[:2]), sys.exc_info()[1])

    def server_close(self) -> None:
        super().server_close()
        for _, sock in self._refused:
            sock.close()
        self._refused = []


class StatusServer:
    """The listener of [server] http, its accept loop in a daemon thread; OSError at bind,
    naming the address and what it is for.  update() takes new access keys live.
    start() and follow() below announce it."""

    head_timeout = HEAD_TIMEOUT
    max_requests = MAX_REQUESTS
    max_per_source = MAX_PER_SOURCE

    def __init__(self, app: Any, settings: Any):
        self.app = app
        self.configured = settings.http
        self.settings = settings
        self.access = access_of(settings)
        self.source_log = SourceLog(log)
        self.errors = LimitedLog(log)
        host, port = parse_hostport(settings.http, allow_empty_host=True, allow_zero_port=True)
        self._host = _canonical(host) if host not in _ANY else ""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._httpd = _Listener((host or "0.0.0.0", port), family, self)
        except OSError as exc:
            raise OSError(exc.errno, "the status page ([server] http) cannot listen on %s: %s"
                          % (settings.http, exc.strerror or exc)) from None
        self.address = self._httpd.server_address[:2]
        self.where = format_hostport(*self.address)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.25,),
                                        name="tcprc-http", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        """Who may see it, for the line that announces it."""
        access = self.access
        if access.token is None:
            login = "no login"
        else:
            login = "login with http_token" + (" (/metrics open)" if access.metrics_open else "")
        names = ", ".join(self.settings.http_hosts)
        return login + "; host names: this address" + (", " + names if names else "")

    def warn_if_open(self) -> None:
        if self.address[0].startswith(_LOOPBACK):
            return
        if self.access.token is None:
            log.warning("[server] http %s is not a loopback address and has no http_token: "
                        "whoever reaches it sees every device's id, addresses, services and "
                        "errors (/, /api/devices) and /metrics; set [server] http_token (or "
                        "http_token_file) or bind it to 127.0.0.1", self.configured)
        elif self.access.metrics_open:
            log.warning("[server] http %s: /metrics is served without the token "
                        "(http_metrics_open): whoever reaches it sees every device's id and "
                        "counters", self.configured)

    def update(self, settings: Any) -> List[str]:
        """New http_token, http_metrics_open, http_hosts: in force for the next request.
        Returns what changed, for the caller's one line."""
        access = access_of(settings)
        old, self.access, self.settings = self.access, access, settings
        changed = []
        if access.token != old.token:
            changed.append("http_token " + ("removed" if access.token is None else
                                            "set" if old.token is None else "changed"))
        if access.metrics_open != old.metrics_open:
            changed.append("http_metrics_open = %s" % str(access.metrics_open).lower())
        if access.hosts != old.hosts:
            changed.append("http_hosts = [%s]" % ", ".join(settings.http_hosts))
        return changed

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # ---- one request (its own thread) -------------------------------------------------
    def serve(self, sock: socket.socket, peer: Any) -> None:
        who, key = format_hostport(*peer[:2]), source_key(peer[0])
        try:
            try:
                request = parse_head(read_head(sock, time.monotonic() + self.head_timeout))
            except HeadError as exc:
                if exc.status is not None:
                    self.source_log.warning(key, "status page: request from %s refused (%d): %s",
                                            who, exc.status, exc.reason)
                    self._send(sock, exc.status, exc.reason + "\n")
                    _drain(sock)
                return   # left or idle before asking anything (a browser's preconnect)
            status, body, kind, extra = self._answer(request, sock.getsockname()[0], key, who)
            self._send(sock, status, body, kind, extra, request.method == "HEAD")
            if status >= 400:
                _drain(sock)
        except OSError as exc:   # hung up, reset, or too slow to take the answer
            self.source_log.log(key, logging.DEBUG, "status page: %s hung up: %s", who,
                                "timed out" if isinstance(exc, socket.timeout)
                                else exc.strerror or exc)

    def _answer(self, request: Request, local: str, key: Any,
                who: str) -> Tuple[int, Any, str, Dict[str, str]]:
        """(status, body, content type, more headers) for `request`."""
        text = "text/plain; charset=utf-8"
        if request.method not in ("GET", "HEAD"):
            return 405, "only GET and HEAD\n", text, {"Allow": "GET, HEAD"}
        host = request.headers.get("host")
        if host is None and request.version != "HTTP/1.0":
            return 400, "a Host header is required\n", text, {}
        access = self.access
        if host is not None and not self._host_ok(host, local, access):
            self.source_log.warning(key, "status page: request from %s for host %r refused: "
                                    "not this address nor in [server] http_hosts (a DNS "
                                    "rebinding attempt, or a name to add there)", who, host[:100])
            return 421, "this server does not answer to that host name\n", text, {}
        path = request.path
        if access.token is not None and not (path == "/metrics" and access.metrics_open):
            given = credentials_ok(request.headers.get("authorization"), access.token)
            if not given:
                if given is False:
                    self.source_log.warning(key, "status page: request from %s refused: wrong "
                                            "credentials", who)
                return 401, "log in with the token of [server] http_token\n", text, {
                    "WWW-Authenticate": "Basic realm=\"tcprc fleet\", charset=\"UTF-8\""}
        app = self.app
        if path == "/metrics":
            return 200, metrics_text(app.devices(), app.auth_failures, app.cluster_metrics()), \
                "text/plain; version=0.0.4; charset=utf-8", {}
        if path == "/api/devices":
            return 200, json.dumps(app.devices()), "application/json", {}
        if path in ("/", "/index.html"):
            return 200, page(access.token is not None), "text/html; charset=utf-8", {}
        return 404, "not found\n", text, {}

    def _host_ok(self, value: str, local: str, access: Access) -> bool:
        try:
            name, port = split_host(value)
        except ValueError:
            return False
        port = port or 80
        for allowed, allowed_port in access.hosts:
            if name == allowed and allowed_port in (None, port):
                return True
        if port != self.address[1]:
            return False
        local = _canonical(local)
        return name in (local, self._host) or (name == "localhost" and local.startswith(_LOOPBACK))

    def _send(self, sock: socket.socket, status: int, body: Any, kind: str = "",
              extra: Optional[Dict[str, str]] = None, head_only: bool = False) -> None:
        data = body if isinstance(body, bytes) else body.encode()
        lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "")),
                 "Content-Type: " + (kind or "text/plain; charset=utf-8"),
                 "Content-Length: %d" % len(data), "Cache-Control: no-store",
                 "X-Content-Type-Options: nosniff", "X-Frame-Options: DENY",
                 "Referrer-Policy: no-referrer", "Content-Security-Policy: " + CSP,
                 "Connection: close"]
        lines += ["%s: %s" % item for item in (extra or {}).items()]
        sock.settimeout(SEND_TIMEOUT)   # for the whole sendall (Python >= 3.5)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                     + (b"" if head_only else data))


def _drain(sock: socket.socket) -> None:
    """After an error answer: read what the client still sends for a moment, so the
    close is not a reset that could destroy the answer before it is read."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + DRAIN
        left = 1 << 20
        while left > 0 and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass


_FOLLOW = threading.Lock()   # a SIGHUP and a `config set` do not move it at once


def start(app: Any, settings: Any) -> StatusServer:
    """The status page of `settings` (OSError naming the address if it cannot listen),
    announced in one line (and a warning when it is open to others)."""
    server = StatusServer(app, settings)
    log.info("status page on http://%s/ (/, /api/devices, /metrics): %s", server.where,
             server.describe())
    server.warn_if_open()
    return server


def follow(current: Optional[StatusServer], app: Any, settings: Any) -> Optional[StatusServer]:
    """[server] http or its keys in new settings (SIGHUP, config set): the status page
    starts, moves, stops or takes the new keys, with one line saying so.  The one
    serving afterwards is returned: a new address that cannot be bound is one
    WARNING line, and the old listener stays (with the new keys)."""
    with _FOLLOW:
        if not settings.http:
            if current is not None:
                current.close()
                log.info("status page on %s stopped ([server] http is empty)", current.where)
            return None
        if current is None:
            try:
                return start(app, settings)
            except OSError as exc:
                log.warning("cannot start the status page: %s; [server] http stays off",
                            exc.strerror)
                return None
        if settings.http == current.configured:
            changed = current.update(settings)
            if changed:
                log.info("status page on %s: %s applied", current.where, ", ".join(changed))
                current.warn_if_open()
            return current
        return _move(current, app, settings)


def _move(current: StatusServer, app: Any, settings: Any) -> Optional[StatusServer]:
    try:
        new = StatusServer(app, settings)
    except OSError as exc:
        import errno
        _, port = parse_hostport(settings.http, allow_empty_host=True, allow_zero_port=True)
        if exc.errno == errno.EADDRINUSE and port == current.address[1]:
            return _swap(current, app, settings)
        changed = current.update(settings)
        log.warning("cannot move the status page: %s; it stays on %s%s", exc.strerror,
                    current.where, (" (" + ", ".join(changed) + " applied)") if changed else "")
        current.warn_if_open()
        return current
    current.close()
    log.info("status page moved from %s to http://%s/: %s", current.where, new.where,
             new.describe())
    new.warn_if_open()
    return new


def _swap(current: StatusServer, app: Any, settings: Any) -> Optional[StatusServer]:
    """A new address on the current port (127.0.0.1:9100 -> 0.0.0.0:9100) can only be
    bound once the current listener is closed; if it still fails, the old address
    is opened again (with the new keys)."""
    current.close()
    try:
        new = StatusServer(app, settings)
    except OSError as exc:
        try:
            back = StatusServer(app, settings._replace(http=current.configured))
        except OSError as again:
            log.warning("cannot move the status page: %s; nor reopen it: %s; it is stopped",
                        exc.strerror, again.strerror)
            return None
        log.warning("cannot move the status page: %s; it stays on %s", exc.strerror,
                    back.where)
        back.warn_if_open()
        return back
    log.info("status page moved from %s to http://%s/: %s", current.where, new.where,
             new.describe())
    new.warn_if_open()
    return new
