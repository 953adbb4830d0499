"""The cluster as the watch last told it: who holds which device, which servers
exist.  Filled by the registry's watch thread (reset from a listing, then
events); read by any thread; waiters are woken on every change (no polling).
"""

import logging
import threading
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Union

from ..engine.ratelog import LimitedLog
from .etcd import Event, KeyValue
from .records import ClaimRecord, Keys, NodeInfo, decode_claim, decode_node

Record = Union[ClaimRecord, NodeInfo, None]

MAX_SEEN = 256   # nodes remembered after their key went (ctl cluster: "lease expired")


class Change(NamedTuple):
    kind: str            # "device" or "node"
    name: str            # the device id or node name
    old: Record
    new: Record          # None: the key is gone
    revision: int        # when it changed


class ClusterCache:
    """Devices and nodes of the cluster, under one lock.

    Lock order: a `wait` predicate may take the registry's lock inside this
    one; nobody takes this one inside the registry's.
    """

    def __init__(self, keys: Keys, log: logging.Logger):
        self._keys = keys
        self._cond = threading.Condition()
        self._devices = {}       # type: Dict[str, ClaimRecord]
        self._nodes = {}         # type: Dict[str, NodeInfo]
        # Every node seen since this server started, as last seen: one whose key
        # went (its lease expired) is still shown, as down.
        self._seen = {}          # type: Dict[str, NodeInfo]
        self.revision = 0        # the last revision applied
        self._bad = LimitedLog(log, 10.0)

    def reset(self, kvs: Iterable[KeyValue], revision: int) -> List[Change]:
        """Replace everything with a full listing made at `revision`."""
        devices, nodes = {}, {}   # type: Dict[str, ClaimRecord], Dict[str, NodeInfo]
        for kv in kvs:
            record = self._decode(kv)
            if isinstance(record, ClaimRecord):
                devices[record.device_id] = record
            elif isinstance(record, NodeInfo):
                nodes[record.name] = record
        with self._cond:
            changes = self._diff("device", self._devices, devices, revision) + \
                self._diff("node", self._nodes, nodes, revision)
            self._devices, self._nodes = devices, nodes
            self._remember(nodes.values())
            self.revision = revision
            self._cond.notify_all()
        return changes

    @staticmethod
    def _diff(kind: str, old: Dict[str, Record], new: Dict[str, Record], revision: int) -> List[Change]:
        changes = []
        for name in set(old) | set(new):
            before, after = old.get(name), new.get(name)
            if before != after:
                at = after.revision if isinstance(after, ClaimRecord) else revision
                changes.append(Change(kind, name, before, after, at))
        return changes

    def apply(self, events: List[Event]) -> List[Change]:
        """Events of the watch, in order."""
        changes = []
        with self._cond:
            for event in events:
                parsed = self._keys.parse(event.kv.key)
                if parsed is None:
                    continue
                kind, name = parsed
                table = self._devices if kind == "device" else self._nodes   # type: Dict[str, Record]
                # An undecodable value (logged) names no holder: as if deleted.
                new = None if event.kind == "DELETE" else self._decode(event.kv)
                old = table.pop(name, None)
                if new is not None:
                    table[name] = new
                    if kind == "node":
                        self._remember([new])
                changes.append(Change(kind, name, old, new, event.kv.mod_revision))
                self.revision = max(self.revision, event.kv.mod_revision)
            if changes:
                self._cond.notify_all()
        return changes

    def _remember(self, nodes: Iterable[Record]) -> None:
        """Under the lock: `nodes` seen now.  Bounded: over MAX_SEEN, the oldest
        ones whose key is gone are forgotten."""
        for node in nodes:
            if isinstance(node, NodeInfo):
                self._seen.pop(node.name, None)
                self._seen[node.name] = node      # the newest last
        for name in [n for n in self._seen if n not in self._nodes]:
            if len(self._seen) <= MAX_SEEN:
                break
            del self._seen[name]

    def _decode(self, kv: KeyValue) -> Record:
        parsed = self._keys.parse(kv.key)
        if parsed is None:
            return None
        kind, name = parsed
        try:
            if kind == "device":
                return decode_claim(name, kv.value, kv.mod_revision, kv.lease)
            return decode_node(name, kv.value)
        except (ValueError, UnicodeDecodeError) as exc:
            self._bad.warning("cluster: ignoring %s key %r in etcd: %s", kind, name[:80], exc)
            return None

    def claim(self, device_id: str) -> Optional[ClaimRecord]:
        with self._cond:
            return self._devices.get(device_id)

    def node(self, name: str) -> Optional[NodeInfo]:
        with self._cond:
            return self._nodes.get(name)

    def devices(self) -> Dict[str, ClaimRecord]:
        with self._cond:
            return dict(self._devices)

    def nodes(self) -> Dict[str, NodeInfo]:
        with self._cond:
            return dict(self._nodes)

    def seen_nodes(self) -> Dict[str, NodeInfo]:
        """Every node seen since the start (at most MAX_SEEN gone ones), up or not."""
        with self._cond:
            return dict(self._seen)

    def wait(self, predicate: Callable[[], object], timeout: float) -> object:
        """predicate()'s first truthy value, re-checked on every change, or its
        last value after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def notify(self) -> None:
        """Wake the waiters: something a predicate reads changed outside the cache."""
        with self._cond:
            self._cond.notify_all()
