"""The registry: this server's lease, node key and device claims in etcd, and a
watch-fed cache of everybody's.

Two threads.  The keeper owns the lease: it grants one (TTL lease_ttl), renews
it every third of that, writes the node key and every claim and release
under it; a lease lost (expired while etcd was away) is granted again and
the node and every held claim written again.  The watcher lists the
cluster's prefix once, then follows it with a watch resumed from the last
revision after a break (listed again when that revision was compacted).

Claims and releases are transactions compared on the key's revision: a claim
is written only over the revision this server knew when it made the claim
(or its own last write, or no key at all), a release deletes only the
revision it wrote, so a claim newer than ours is never overwritten nor
deleted.  When another node's claim replaces one of ours, on_claim_lost(id,
node) says so once (from the watch, or from a write that found it).

The registry is a hint, the uplink the truth: losing etcd closes nothing.
Without contact the cache serves holder() for at most lease_ttl, then
RegistryUnavailable; own claims count as registered until the lease would
have expired.  claim() and release() never block on etcd.
"""

import logging
import os
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from ..addr import format_hostport
from ..errors import TcprcError
from ..settings import ClusterSettings
from .cache import Change, ClusterCache
from .etcd import (Compacted, EtcdClient, EtcdError, LeaseNotFound, WatchStream, delete, get,
                   parse_endpoint, prefix_end, put, range_answer, unchanged_since)
from .records import Keys, NodeInfo, decode_claim, encode_claim, encode_node

log = logging.getLogger("tcprc")

MAX_WRITE_TRIES = 3     # per claim write: a key that keeps changing under us is someone else's


class RegistryUnavailable(TcprcError):
    """No contact with etcd for longer than lease_ttl: the cache is not trusted."""


class ClaimToken(NamedTuple):
    """What claim() returns and release() takes: one uplink session of a device."""
    device_id: str
    session: str


class RegistryState(NamedTuple):
    """What a status page shows of the registry."""
    up: bool
    state: str            # "starting", "up", "down", "stopped"
    detail: str           # one line: the endpoint in use, or why it is down
    lease_left: float     # seconds our lease is believed to live (0: no lease)
    claims: int           # devices held by this server
    registered: int       # of them, believed to be in etcd now
    nodes: int            # servers in the cache, this one included
    devices: int          # claims in the cache


class _Held:
    """One device session this server holds, as the keeper writes it."""
    __slots__ = ("token", "since", "source", "base", "written", "lost")

    def __init__(self, token: ClaimToken, since: float, source: str, base: Optional[int]):
        self.token = token
        self.since = since
        self.source = source
        # The revision a write compares with: what the cache knew at claim time,
        # then our own write's (0: no key; None: unknown, the cache was not
        # usable when the claim was made).
        self.base = base
        self.written = False      # our value is in etcd under the current lease
        self.lost = False         # another node's newer claim replaced it: never written again


class Registry:
    """This server's place in the cluster's etcd.  start(), then claim()/release()
    from any thread, holder()/wait_for_holder() for clients, stop() last."""

    def __init__(self, settings: ClusterSettings, me: NodeInfo,
                 on_claim_lost: Optional[Callable[[str, str], None]] = None):
        self.settings = settings
        self.node = settings.node
        self.keys = Keys(settings.name)
        self.ttl = settings.lease_ttl
        self.interval = self.ttl / 3.0
        self.down_after = 2 * self.interval
        self.call_timeout = max(0.5, min(2.0, self.interval))
        self.endpoints = [parse_endpoint(url) for url in settings.etcd]
        self.on_claim_lost = on_claim_lost
        self.cache = ClusterCache(self.keys, log)
        self._me = me._replace(name=self.node, instance=me.instance or os.urandom(8).hex(),
                               local=True)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)   # the keeper waits on it for work
        self._held = {}            # type: Dict[str, _Held]
        self._deletes = []         # type: List[Tuple[bytes, int]]   key, revision we wrote
        self._node_dirty = True
        self._lease = 0            # 0: none
        self._lease_deadline = 0.0
        self._next_keepalive = 0.0
        self._last_ok = -1e9       # monotonic time of the last successful keeper call
        self._last_error = ""
        self._stream = None        # type: Optional[WatchStream]
        self._watch_alive = -1e9   # monotonic time the watch was last known open
        self._watching = False
        self._clash_warned = False
        self._down_logged = False
        self._keeper_endpoint = 0  # index of the endpoint the keeper talks to
        self._state = "starting"   # "running" after the first grant, "stopped" at the end
        self._stop = threading.Event()
        self._threads = []         # type: List[threading.Thread]
        self._clients = []         # type: List[EtcdClient]
        self.requests = 0          # etcd requests by closed clients; see request_count()

    def __repr__(self) -> str:
        return "Registry(node=%r, %s)" % (self.node, self._state)

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("keeper", self._keeper), ("watch", self._watcher)):
            thread = threading.Thread(target=target, name="cluster-%s" % name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads, then revoke the lease: every claim of ours goes at once."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
            stream = self._stream
        if stream is not None:
            stream.abort()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            lease, self._lease = self._lease, 0
            alive = time.monotonic() < self._lease_deadline   # else etcd dropped it already
            held = len(self._held)
            self._state = "stopped"
        if lease and alive:
            client = self._client()
            try:
                client.revoke(lease)
                log.info("cluster: left etcd (lease revoked, %d claim(s) released)", held)
            except EtcdError as exc:
                log.warning("cluster: could not revoke the lease (%s); its %d claim(s) expire "
                            "within %d s", exc, held, self.ttl)
            finally:
                self._close_client(client)
        self.cache.notify()

    def _client(self) -> EtcdClient:
        client = EtcdClient(self.endpoints, self.call_timeout)
        with self._lock:
            self._clients.append(client)
        return client

    def _close_client(self, client: EtcdClient) -> None:
        client.close()
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
                self.requests += client.calls

    def request_count(self) -> int:
        """etcd requests sent so far (the bench divides it by time)."""
        with self._lock:
            return self.requests + sum(c.calls for c in self._clients)

    # -- claims ------------------------------------------------------------------

    def claim(self, device_id: str, source: str) -> ClaimToken:
        """This server now holds `device_id`'s newest session (from `source`,
        "ADDR:PORT").  Returns at once; the keeper writes it."""
        with self._lock:
            synced = self._cache_usable(time.monotonic())
        known = self.cache.claim(device_id)
        base = (known.revision if known is not None else 0) if synced else None
        token = ClaimToken(device_id, os.urandom(12).hex())
        held = _Held(token, time.time(), source, base)
        with self._wake:
            self._held[device_id] = held
            self._wake.notify_all()
        self.cache.notify()
        return token

    def release(self, token: ClaimToken) -> None:
        """The session of `token` ended.  A newer claim (here or elsewhere) stays."""
        with self._wake:
            held = self._held.get(token.device_id)
            if held is None or held.token != token:
                return
            del self._held[token.device_id]
            if held.written and not held.lost:
                self._deletes.append((self.keys.device(token.device_id), held.base))
                self._wake.notify_all()
        self.cache.notify()

    def held_ids(self) -> List[str]:
        """The devices whose uplink this server holds (claims not lost)."""
        with self._lock:
            return [ident for ident, held in self._held.items() if not held.lost]

    def holds(self, device_id: str) -> bool:
        with self._lock:
            held = self._held.get(device_id)
            return held is not None and not held.lost

    def claim_state(self, device_id: str) -> Optional[str]:
        """None (not held here), "registered" (in etcd, lease alive), "unregistered"
        (not written yet, or the lease may have expired) or "lost" (overwritten)."""
        with self._lock:
            held = self._held.get(device_id)
            if held is None:
                return None
            if held.lost:
                return "lost"
            if held.written and self._lease and time.monotonic() < self._lease_deadline:
                return "registered"
            return "unregistered"

    def update_node(self, **fields: str) -> None:
        """Change what the node key says (http, devices, ...); written at once."""
        with self._wake:
            self._me = self._me._replace(**fields)
            self._node_dirty = True
            self._wake.notify_all()

    @property
    def lease(self) -> int:
        """Our etcd lease id (0: none now)."""
        with self._lock:
            return self._lease

    @property
    def me(self) -> NodeInfo:
        with self._lock:
            return self._me

    # -- what clients need ---------------------------------------------------------

    @property
    def registry_up(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return self._up(now)

    def _up(self, now: float) -> bool:
        watch_ok = self._watching or now - self._watch_alive < self.down_after
        return bool(self._lease) and now - self._last_ok < self.down_after and watch_ok \
            and self._state != "stopped"

    def _cache_usable(self, now: float) -> bool:
        watch = now if self._watching else self._watch_alive
        return now - min(self._last_ok, watch) < self.ttl and self._state != "stopped"

    def holder(self, device_id: str) -> Optional[NodeInfo]:
        """The server holding `device_id`'s uplink: None when it is this one or nobody.
        RegistryUnavailable when etcd was out of reach for longer than lease_ttl."""
        now = time.monotonic()
        with self._lock:
            usable = self._cache_usable(now)
            held = self._held.get(device_id)
            if held is not None and not held.lost:
                return None
        if not usable:
            raise RegistryUnavailable("registry unavailable: no contact with etcd for over %d s"
                                      % self.ttl)
        return self._remote(device_id)

    def _remote(self, device_id: str) -> Optional[NodeInfo]:
        record = self.cache.claim(device_id)
        if record is None or record.node == self.node:
            return None    # ours from an earlier life of this node: nobody holds it now
        return self.cache.node(record.node)

    def wait_for_holder(self, device_id: str, timeout: float,
                        not_on: str = "") -> Optional[NodeInfo]:
        """Wait up to `timeout` seconds until somebody holds `device_id`: this server
        (its own NodeInfo, local=True) or another; None if nobody by then.  Woken by
        the watch and by claim(), never by polling.  `not_on`: a node that just
        failed the caller (dead, or the device left it): its claim, still in the
        registry until it is replaced or expires, does not count."""
        def found() -> Optional[NodeInfo]:
            now = time.monotonic()
            with self._lock:
                held = self._held.get(device_id)
                if held is not None and not held.lost:
                    return self._me
                if not self._cache_usable(now):
                    return None
            node = self._remote(device_id)
            return None if node is not None and node.name == not_on else node
        result = self.cache.wait(found, timeout)
        return result if isinstance(result, NodeInfo) else None

    def state(self) -> RegistryState:
        now = time.monotonic()
        with self._lock:
            up = self._up(now)
            state = "up" if up else ("down" if self._state == "running" else self._state)
            if up:
                endpoint = self.endpoints[self._keeper_endpoint]
                detail = "etcd %s" % format_hostport(*endpoint)
            else:
                detail = self._last_error or "connecting"
            lease_left = max(0.0, self._lease_deadline - now) if self._lease else 0.0
            claims = sum(1 for h in self._held.values() if not h.lost)
            registered = sum(1 for h in self._held.values()
                             if h.written and not h.lost and lease_left > 0)
        return RegistryState(up, state, detail, round(lease_left, 1), claims, registered,
                             len(self.cache.nodes()), len(self.cache.devices()))

    # -- the keeper: lease, node key, writes ---------------------------------------------

    def _keeper(self) -> None:
        client = self._client()
        backoff = 0.1
        try:
            while not self._stop.is_set():
                try:
                    self._keep(client)
                    backoff = 0.1
                except LeaseNotFound:
                    log.warning("cluster: our etcd lease is gone; registering again")
                    self._drop_lease()
                except EtcdError as exc:
                    self._failed(str(exc))
                    # Retry soon, and be awake when the registry turns stale, to
                    # say so and to end the watch then, not a call later.
                    with self._lock:
                        stale_in = self._last_ok + self.down_after - time.monotonic()
                    self._stop.wait(min(backoff, stale_in) if stale_in > 0 else backoff)
                    backoff = min(backoff * 2, self.interval / 2)
                    self._failed(str(exc))
                except Exception:   # fault barrier: log it, keep the registry alive
                    log.exception("cluster: registry keeper failed; retrying")
                    self._stop.wait(1.0)
                self._keeper_endpoint = client.current
        finally:
            self._close_client(client)

    def _keep(self, client: EtcdClient) -> None:
        now = time.monotonic()
        with self._lock:
            lease = self._lease
            expired = bool(lease) and now > self._lease_deadline
            if expired:
                lease = 0
                self._drop_lease_locked()
        if expired:
            log.warning("cluster: no contact with etcd for longer than the lease: our "
                        "claims are not believed until etcd is back")
        if not lease:
            sent = time.monotonic()
            lease, ttl = client.grant(self.ttl)
            self._ok()
            with self._lock:
                self._lease, self._lease_deadline = lease, sent + ttl
                self._next_keepalive = sent + self.interval
                self._node_dirty = True
                for held in self._held.values():
                    held.written = False
                self._deletes = []
                held_count = len(self._held)
            log.info("cluster: registered in etcd as node %s (lease %x, %d s%s)", self.node,
                     lease, ttl, ", claiming %d device(s) again" % held_count if held_count else "")
        if time.monotonic() >= self._next_keepalive:
            sent = time.monotonic()
            ttl = client.keepalive(lease)
            self._ok()
            with self._lock:
                self._lease_deadline = sent + ttl
                self._next_keepalive = sent + self.interval
        if self._write_one(client, lease):
            return
        with self._wake:
            if self._work_locked() or self._stop.is_set():
                return
            self._wake.wait(max(0.0, self._next_keepalive - time.monotonic()))

    def _ok(self) -> None:
        with self._lock:
            was_up = self._up(time.monotonic())
            self._last_ok = time.monotonic()
            self._last_error = ""
            if self._state == "starting":
                self._state = "running"
            back, self._down_logged = self._down_logged, False
        if back:
            log.info("cluster: registry available again")
        if not was_up:
            self.cache.notify()

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._last_error = error
            stale = now - self._last_ok >= self.down_after
            first, self._down_logged = stale and not self._down_logged, self._down_logged or stale
            stream = self._stream if stale else None
        if first:
            log.warning("cluster: registry unavailable (%s); nothing is closed for it", error)
        if stream is not None:
            stream.abort()   # a member that hangs would keep the watch silent for good

    def _drop_lease(self) -> None:
        with self._lock:
            self._drop_lease_locked()

    def _drop_lease_locked(self) -> None:
        self._lease = 0
        self._lease_deadline = 0.0
        for held in self._held.values():
            held.written = False
        self._deletes = []

    def _work_locked(self) -> bool:
        return self._node_dirty or bool(self._deletes) or any(
            not h.written and not h.lost for h in self._held.values())

    def _write_one(self, client: EtcdClient, lease: int) -> bool:
        """Write the node key, one claim or one release; False when there is nothing to do."""
        with self._lock:
            if self._node_dirty:
                self._node_dirty = False
                me = self._me
                job = ("node", me)        # type: Tuple[str, object]
            elif self._deletes:
                job = ("delete", self._deletes.pop(0))
            else:
                pending = [h for h in self._held.values() if not h.written and not h.lost]
                if not pending:
                    return False
                job = ("claim", pending[0])
        kind, what = job
        try:
            if kind == "node":
                client.txn([], [put(self.keys.node(self.node), encode_node(what), lease)], [])
            elif kind == "delete":
                key, revision = what
                client.txn([unchanged_since(key, revision)], [delete(key)], [])
            else:
                self._write_claim(client, lease, what)
        except EtcdError:
            with self._lock:   # do it again later
                if kind == "node":
                    self._node_dirty = True
                elif kind == "delete":
                    self._deletes.insert(0, what)
            raise
        self._ok()
        return True

    def _write_claim(self, client: EtcdClient, lease: int, held: _Held) -> None:
        key = self.keys.device(held.token.device_id)
        value = encode_claim(self.node, held.token.session, held.since, held.source)
        # A base we did not know (no usable cache at claim time) is settled by
        # the sessions' start times instead: the newer session wins.
        unknown = held.base is None
        base = held.base or 0
        for _ in range(MAX_WRITE_TRIES):
            ok, responses, revision = client.txn([unchanged_since(key, base)],
                                                 [put(key, value, lease)], [get(key)])
            if ok:
                return self._written(held, revision)
            found = range_answer(responses)
            if not found:
                base = 0      # gone meanwhile (its lease expired): nobody holds it
                continue
            kv = found[0]
            try:
                record = decode_claim(held.token.device_id, kv.value, kv.mod_revision, kv.lease)
            except (ValueError, UnicodeDecodeError):
                base = kv.mod_revision   # not a claim: nobody's, ours to replace
                continue
            if record.node == self.node:
                if record.session == held.token.session:
                    return self._written(held, kv.mod_revision)   # an earlier try of ours landed
                base = kv.mod_revision   # this node's, from an earlier session or process
                continue
            if unknown and record.since <= held.since:
                base = kv.mod_revision   # a session older than ours: ours wins
                continue
            return self._lost(held, record.node, "its claim at revision %d is newer than ours"
                              % kv.mod_revision)
        log.warning("cluster: device %s: its key kept changing while we claimed it; trying "
                    "again", held.token.device_id)
        self._stop.wait(0.1)

    def _written(self, held: _Held, revision: int) -> None:
        with self._wake:
            current = self._held.get(held.token.device_id) is held and not held.lost
            if current:
                held.written, held.base = True, revision
            else:   # released while we wrote it: take it back out
                self._deletes.append((self.keys.device(held.token.device_id), revision))
                self._wake.notify_all()

    def _lost(self, held: _Held, node: str, why: str) -> None:
        with self._lock:
            if held.lost:
                return
            held.lost = True
            current = self._held.get(held.token.device_id) is held
        self.cache.notify()
        if not current:
            return
        log.info("cluster: device %s is claimed by node %s (%s)", held.token.device_id, node, why)
        if self.on_claim_lost is not None:
            try:
                self.on_claim_lost(held.token.device_id, node)
            except Exception:   # fault barrier: the owner's bug must not stop the registry
                log.exception("cluster: on_claim_lost(%s, %s) failed", held.token.device_id, node)

    # -- the watcher: the cache ---------------------------------------------------------

    def _watcher(self) -> None:
        client = self._client()
        prefix, end = self.keys.prefix, prefix_end(self.keys.prefix)
        listed = False
        backoff = 0.1
        try:
            while not self._stop.is_set():
                stream = None
                try:
                    if not listed:
                        kvs, revision = client.range(prefix, end)
                        self._examine(self.cache.reset(kvs, revision))
                        listed = True
                    start = self.cache.revision + 1
                    stream = client.watch(prefix, end, start)
                    if stream.created_revision < start - 1:
                        # etcd's store is behind our cache: a new cluster.  List it again.
                        log.warning("cluster: etcd is at revision %d, before the %d we saw: "
                                    "listing again", stream.created_revision, start - 1)
                        listed = False
                        continue
                    with self._lock:
                        if self._stop.is_set():
                            break
                        self._stream, self._watching = stream, True
                    backoff = 0.1
                    while True:
                        events = stream.next()
                        if events:
                            self._examine(self.cache.apply(events))
                except Compacted as exc:
                    log.info("cluster: the watch fell behind (%s): listing again", exc)
                    listed = False
                except (EtcdError, OSError, ValueError) as exc:
                    if not self._stop.is_set():
                        log.debug("cluster: watch: %s", exc)
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, self.interval)
                except Exception:   # fault barrier
                    log.exception("cluster: watch failed; starting it again")
                    self._stop.wait(1.0)
                finally:
                    if stream is not None:
                        stream.close()
                    with self._lock:
                        if self._watching:
                            self._watch_alive = time.monotonic()
                        self._stream, self._watching = None, False
        finally:
            self._close_client(client)

    def _examine(self, changes: List[Change]) -> None:
        """What the watch saw, against what we hold: claims lost, keys to write again."""
        for change in changes:
            if change.kind == "node":
                self._check_node(change)
                continue
            lost = None
            with self._wake:
                held = self._held.get(change.name)
                if held is None or held.lost or not held.written \
                        or change.revision <= (held.base or 0):
                    continue   # not ours, or older than our write, or our write will see it
                new = change.new
                if new is None:
                    # Our key went (deleted by hand, or our lease expired): write it
                    # again; the compare on "no key" keeps a newer claim safe.
                    held.written, held.base = False, 0
                    self._wake.notify_all()
                elif new.node != self.node or new.session != held.token.session:
                    lost = new   # another node's; or our name's from another server (a clash)
            if lost is not None:
                self._lost(held, lost.node, "its claim at revision %d" % lost.revision)

    def _check_node(self, change: Change) -> None:
        new = change.new
        if change.name != self.node or not isinstance(new, NodeInfo):
            return
        with self._lock:
            mine = self._me.instance
            warn = new.instance != mine and not self._clash_warned
            self._clash_warned = self._clash_warned or warn
        if warn:
            log.warning("cluster: another server writes node key %s (peer %s): node names "
                        "must be unique in the cluster", self.node, new.peer)
