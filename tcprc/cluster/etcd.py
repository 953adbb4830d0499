"""etcd v3 through its JSON gateway with http.client alone (no grpc, no protobuf).

Every call is a POST of a JSON body to a /v3/ path (etcd 3.4 serves /v3/ and
/v3beta/); keys and values travel in base64 and 64-bit numbers as strings.
With several endpoints, a call that fails on one (refused, timed out, or an
answer that says that member cannot serve now: no leader, unavailable) is
tried on the next, and the one that answered is asked first next time.
EtcdUnavailable when none answered.

An EtcdClient belongs to one thread: it keeps its HTTP connection alive
between calls.  A WatchStream has a connection of its own, read line by line
in its own thread; abort() from another thread ends a read blocked on it.
"""

import base64
import http.client
import json
import socket
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..addr import format_hostport, parse_hostport
from ..errors import PeerError

Endpoint = Tuple[str, int]

MAX_RESPONSE = 64 * 1024 * 1024    # bytes of one answer or one watch line; ours are small
# gRPC status codes that say "this member cannot serve now: ask another".
_RETRY_CODES = frozenset((1, 2, 4, 8, 10, 13, 14))
_NOT_FOUND = 5
_HEADERS = {"Content-Type": "application/json",
            # A watch on a member cut off from its leader is canceled instead of
            # staying open and silent (etcd's require-leader metadata).
            "Grpc-Metadata-hasleader": "true"}


class EtcdError(PeerError):
    """etcd refused or failed a request; one line for the log."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered."""


class LeaseNotFound(EtcdError):
    """The lease is gone (expired or revoked)."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away: list again."""

    def __init__(self, revision: int):
        super().__init__("revisions before %d are compacted" % revision)
        self.revision = revision


class KeyValue(NamedTuple):
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


class Event(NamedTuple):
    kind: str            # "PUT" or "DELETE"
    kv: KeyValue         # a DELETE's has the key and mod_revision only


def parse_endpoint(url: str) -> Endpoint:
    """"http://ADDR:PORT" (a trailing / allowed) -> (ADDR, PORT); ValueError if not."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ValueError("expected http://ADDR:PORT, got %r" % url)
    return parse_hostport(rest.rstrip("/"), allow_empty_host=False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any) -> bytes:
    return base64.b64decode(text or "", validate=True)


def number(doc: Dict[str, Any], key: str) -> int:
    """An int64 field of an answer: a string in JSON, absent when 0."""
    return int(doc.get(key) or 0)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range or a watch cover every key starting with `prefix`."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"    # every key
    end[-1] += 1
    return bytes(end)


def _kv(doc: Dict[str, Any]) -> KeyValue:
    return KeyValue(unb64(doc.get("key")), unb64(doc.get("value")),
                    number(doc, "mod_revision"), number(doc, "lease"))


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]


def _http_error(status: int, body: bytes) -> Tuple[int, str]:
    """(gRPC code or -1, message) of an error answer: {"code", "message"} from unary
    calls, {"error": {"grpc_code", "message"}} from streaming ones."""
    try:
        doc = json.loads(body.decode("utf-8"))
        if isinstance(doc.get("error"), dict):
            doc = dict(doc["error"], code=doc["error"].get("grpc_code", -1))
        return int(doc.get("code", -1)), _one_line(doc.get("message") or doc.get("error")
                                                   or "HTTP %d" % status)
    except (ValueError, AttributeError, TypeError):
        return -1, "HTTP %d" % status


class EtcdClient:
    """Calls to one etcd cluster (any of `endpoints`), each bounded by `timeout` seconds
    per endpoint tried."""

    def __init__(self, endpoints: List[Endpoint], timeout: float):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.current = 0                    # the endpoint that answered last
        self._conn = None                   # type: Optional[http.client.HTTPConnection]
        self.calls = 0                      # requests sent, for the bench

    def __repr__(self) -> str:
        return "EtcdClient(%s)" % ", ".join(format_hostport(*e) for e in self.endpoints)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        """POST `body` to `path` on the first endpoint that answers; its JSON answer."""
        data = json.dumps(body, separators=(",", ":")).encode("ascii")
        errors = []
        for attempt in range(len(self.endpoints)):
            index = (self.current + attempt) % len(self.endpoints)
            host, port = self.endpoints[index]
            try:
                status, answer = self._post(index, path, data)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                errors.append("%s: %s" % (format_hostport(host, port), _one_line(exc) or type(exc).__name__))
                continue
            if status == 200:
                self.current = index
                try:
                    doc = json.loads(answer.decode("utf-8"))
                except ValueError:
                    raise EtcdError("%s %s: the answer is not JSON" % (format_hostport(host, port), path)) from None
                return doc if isinstance(doc, dict) else {}
            code, message = _http_error(status, answer)
            if code == _NOT_FOUND and "lease not found" in message:
                self.current = index
                raise LeaseNotFound(message)
            if code in _RETRY_CODES or status >= 500 and code < 0:
                errors.append("%s: %s" % (format_hostport(host, port), message))
                continue
            raise EtcdError("%s %s: %s" % (format_hostport(host, port), path, message))
        self.current = (self.current + 1) % len(self.endpoints)
        raise EtcdUnavailable("no etcd endpoint answered (%s)" % "; ".join(errors))

    def _post(self, index: int, path: str, data: bytes) -> Tuple[int, bytes]:
        if self._conn is None or index != self.current:
            self.close()
            host, port = self.endpoints[index]
            self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self.current = index
        self.calls += 1
        self._conn.request("POST", path, body=data, headers=_HEADERS)
        response = self._conn.getresponse()
        answer = response.read(MAX_RESPONSE + 1)
        if len(answer) > MAX_RESPONSE:
            raise http.client.HTTPException("answer over %d bytes" % MAX_RESPONSE)
        if response.will_close:
            self.close()
        return response.status, answer

    # -- the calls the registry makes ---------------------------------------

    def grant(self, ttl: int) -> Tuple[int, int]:
        """A new lease: (its id, its TTL in seconds)."""
        doc = self.call("/v3/lease/grant", {"TTL": ttl})
        if doc.get("error"):
            raise EtcdError("lease grant: %s" % _one_line(doc["error"]))
        return number(doc, "ID"), number(doc, "TTL")

    def keepalive(self, lease: int) -> int:
        """Renew `lease`: its TTL now; LeaseNotFound when it is gone."""
        doc = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = number(doc.get("result") or {}, "TTL")
        if ttl <= 0:
            raise LeaseNotFound("lease %x is gone" % lease)
        return ttl

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFound:
            pass

    def range(self, key: bytes, range_end: Optional[bytes] = None) -> Tuple[List[KeyValue], int]:
        """The keys from `key` up to `range_end` (only `key` without one), and the revision."""
        body = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        doc = self.call("/v3/kv/range", body)
        return [_kv(kv) for kv in doc.get("kvs") or ()], number(doc.get("header") or {}, "revision")

    def txn(self, compare: List[Dict[str, Any]], success: List[Dict[str, Any]],
            failure: List[Dict[str, Any]]) -> Tuple[bool, List[Dict[str, Any]], int]:
        """(succeeded, the responses of the branch taken, the revision after it)."""
        doc = self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})
        return (bool(doc.get("succeeded")), list(doc.get("responses") or ()),
                number(doc.get("header") or {}, "revision"))

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> "WatchStream":
        """A watch of [key, range_end) from `start_revision`, on the first endpoint that
        creates it."""
        body = json.dumps({"create_request": {
            "key": b64(key), "range_end": b64(range_end),
            "start_revision": str(start_revision), "progress_notify": True}}).encode("ascii")
        errors = []
        for attempt in range(len(self.endpoints)):
            index = (self.current + attempt) % len(self.endpoints)
            stream = WatchStream(self.endpoints[index], self.timeout)
            try:
                stream.open(body)
            except Compacted:
                stream.close()
                raise
            except (OSError, http.client.HTTPException, EtcdError) as exc:
                stream.close()
                errors.append("%s: %s" % (format_hostport(*self.endpoints[index]), _one_line(exc)))
                continue
            self.current = index
            return stream
        self.current = (self.current + 1) % len(self.endpoints)
        raise EtcdUnavailable("no etcd endpoint took the watch (%s)" % "; ".join(errors))


# -- transactions: the compare and request bodies -----------------------------------

def unchanged_since(key: bytes, revision: int) -> Dict[str, Any]:
    """The key was last written at `revision` (0: the key does not exist)."""
    if revision:
        return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def put(key: bytes, value: bytes, lease: int) -> Dict[str, Any]:
    return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}


def delete(key: bytes) -> Dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def get(key: bytes) -> Dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def range_answer(responses: List[Dict[str, Any]]) -> List[KeyValue]:
    """The keys a txn branch's request_range found."""
    for response in responses:
        found = response.get("response_range")
        if found is not None:
            return [_kv(kv) for kv in found.get("kvs") or ()]
    return []


class WatchStream:
    """One watch: a long POST whose answer is one JSON document per line."""

    def __init__(self, endpoint: Endpoint, timeout: float):
        self.endpoint = endpoint
        self._timeout = timeout
        self._conn = http.client.HTTPConnection(endpoint[0], endpoint[1], timeout=timeout)
        self._response = None     # type: Optional[http.client.HTTPResponse]
        self._sock = None         # type: Optional[socket.socket]
        self.created_revision = 0  # etcd's revision when the watch was created

    def open(self, body: bytes) -> None:
        """Send the create request and read its answer (within the timeout)."""
        self._conn.request("POST", "/v3/watch", body=body, headers=_HEADERS)
        self._sock = self._conn.sock
        response = self._conn.getresponse()
        if response.status != 200:
            code, message = _http_error(response.status, response.read(MAX_RESPONSE))
            raise EtcdError("watch: %s" % message)
        self._response = response
        first = self._line()
        if not first.get("created"):
            self._check_canceled(first)
            raise EtcdError("watch: the first answer does not say created")
        self.created_revision = number(first.get("header") or {}, "revision")
        # From here on a quiet watch is normal: no read timeout.  A member that
        # dies resets the connection; one that hangs is aborted by the registry.
        if self._sock is not None:
            self._sock.settimeout(None)

    def _line(self) -> Dict[str, Any]:
        if self._response is None:
            raise EtcdUnavailable("the watch is not open")
        try:
            line = self._response.readline(MAX_RESPONSE + 1)
        except http.client.HTTPException as exc:   # cut mid-chunk: IncompleteRead
            raise EtcdUnavailable("the watch connection to %s ended in an answer (%s)"
                                  % (format_hostport(*self.endpoint), type(exc).__name__)) from None
        if not line:
            raise EtcdUnavailable("the watch connection to %s ended" % format_hostport(*self.endpoint))
        if len(line) > MAX_RESPONSE:
            raise EtcdError("a watch answer over %d bytes" % MAX_RESPONSE)
        try:
            doc = json.loads(line.decode("utf-8"))
        except ValueError:
            raise EtcdError("a watch answer is not JSON") from None
        if not isinstance(doc, dict):
            raise EtcdError("a watch answer is not a JSON object")
        if "error" in doc:
            raise EtcdUnavailable("watch: %s" % _one_line(doc.get("error", {}).get("message")
                                                          if isinstance(doc.get("error"), dict)
                                                          else doc.get("error")))
        result = doc.get("result")
        return result if isinstance(result, dict) else {}

    @staticmethod
    def _check_canceled(result: Dict[str, Any]) -> None:
        if result.get("canceled"):
            compact = number(result, "compact_revision")
            if compact:
                raise Compacted(compact)
            raise EtcdUnavailable("the watch was canceled: %s"
                                  % _one_line(result.get("cancel_reason") or "no reason given"))

    def next(self) -> List[Event]:
        """The next batch of events (empty for a progress notice); blocks until one comes.
        EtcdUnavailable when the stream ends, Compacted when etcd cancels it for that."""
        result = self._line()
        self._check_canceled(result)
        events = []
        for event in result.get("events") or ():
            kind = "DELETE" if event.get("type") == "DELETE" else "PUT"
            events.append(Event(kind, _kv(event.get("kv") or {})))
        return events

    def abort(self) -> None:
        """Wake a thread blocked in next() (it sees the stream end); close() stays its job."""
        sock = self._sock or self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._conn.close()
