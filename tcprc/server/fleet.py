"""The fleet: the configured devices ([server.devices] and devices_dir), what links
look up in it (a device's host, services, secret), and one record per device
(and one for the session on [server] host), kept across its sessions, for
`devices`, /api/devices and /metrics.  Only configured ids get a record, so
guessed ids grow nothing.
"""

import threading
import time
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..addr import format_hostport

# A cloned identity (two live devices with one id on two servers) takes the
# sessions over in turn: after FIGHT_LIMIT of those in FIGHT_WINDOW seconds, a
# node refuses new sessions of the id until FIGHT_WINDOW after the last.
FIGHT_LIMIT = 3
FIGHT_WINDOW = 60.0

# The record of the session on [server] host (legacy, or v2 without identity).
# A colon is no id character, so no device can be named so.
SHARED = ":legacy"


class DeviceRecord:
    """What survives a device's sessions.  Under the app's lock."""

    __slots__ = ("id", "link", "since", "source", "sessions", "auth_failures", "refused",
                 "bytes_up", "bytes_down", "last_error", "forwarded", "fights", "fought_at")

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.link: Any = None                      # the live session (a ServerLink), if any
        self.since: Optional[float] = None         # wall clock of its start
        self.source = ""                           # ADDR:PORT of the latest session
        self.sessions = 0                          # sessions started
        self.auth_failures = 0
        self.refused = 0                           # clients refused (limits)
        self.bytes_up = 0                          # from the device, ended sessions
        self.bytes_down = 0                        # to the device, ended sessions
        self.last_error = ""
        self.forwarded = 0                         # clients forwarded to the node holding it
        self.fights = 0                            # its id answered on two nodes at once
        self.fought_at: List[float] = []           # monotonic times of the recent fights

    def started(self, link: Any) -> None:
        self.link = link
        self.since = time.time()
        self.source = link.name.split(" ", 1)[-1]
        self.sessions += 1

    def ended(self, link: Any, reason: str) -> None:
        """Its bytes join the totals; the record is down unless a successor took over."""
        stats = link.stats()
        self.bytes_up += stats["bytes_received"]
        self.bytes_down += stats["bytes_sent"]
        if reason:
            self.last_error = reason
        if self.link is link:
            self.link = None

    def row(self, host: str, address: Any) -> Dict[str, Any]:
        """One line of the device table: `host` where its clients connect as configured,
        `address` as bound while its session is up."""
        link = self.link
        stats = link.stats() if link is not None else None
        return {
            "id": self.id,
            "state": "up" if stats else "down",
            "source": self.source,
            "since": self.since if stats else None,
            "host": "%s:%d" % address if address else host,
            "protocol": stats["protocol"] if stats else "",
            "tls": stats["tls"] if stats else "",
            "streams": stats["clients"] if stats else 0,
            "bytes_up": self.bytes_up + (stats["bytes_received"] if stats else 0),
            "bytes_down": self.bytes_down + (stats["bytes_sent"] if stats else 0),
            "rtt": stats["rtt"] if stats else None,
            "sessions": self.sessions,
            "auth_failures": self.auth_failures,
            "refused_clients": self.refused,
            "forwarded_clients": self.forwarded,
            "fights": self.fights,
            "last_error": self.last_error,
        }


def sync_records(records: Dict[str, DeviceRecord], devices: Mapping[str, Any]) -> None:
    """Records for exactly the configured ids (and SHARED): new ones made, removed ones dropped."""
    for ident in list(records):
        if ident != SHARED and ident not in devices:
            del records[ident]
    for ident in devices:
        if ident not in records:
            records[ident] = DeviceRecord(ident)
    if SHARED not in records:
        records[SHARED] = DeviceRecord(SHARED)


class Fleet:
    """The devices a server knows and their records.  Thread-safe (its own lock):
    links look devices up and report their sessions from their threads; the
    app replaces the devices on a reload or a devices_dir scan."""

    def __init__(self, devices: Mapping[str, Any], shared_host: str) -> None:
        self._lock = threading.Lock()
        self.devices: Mapping[str, Any] = devices   # id -> DeviceEntry
        self.shared_host = shared_host              # [server] host
        self._records: Dict[str, DeviceRecord] = {}
        self.totals = [0, 0]                        # bytes from / to devices, ended sessions
        sync_records(self._records, devices)

    def set_devices(self, devices: Mapping[str, Any], shared_host: str) -> Mapping[str, Any]:
        """New definitions take effect; returns the old ones."""
        with self._lock:
            old, self.devices = self.devices, devices
            self.shared_host = shared_host
            sync_records(self._records, devices)
        return old

    # ---- what links look up ------------------------------------------------------------
    def host_for(self, device_id: str) -> str:
        """Where a session's clients connect: its device's host, or [server] host."""
        if device_id:
            entry = self.devices.get(device_id)
            if entry is not None:
                return entry.host
        return self.shared_host

    def services_of(self, device_id: str) -> Mapping[str, str]:
        """A configured device's named services: name -> host."""
        entry = self.devices.get(device_id)
        return entry.services if entry is not None else MappingProxyType({})

    def secret_of(self, device_id: str) -> Any:
        """The secret of a configured device (with its previous one while it is
        rotated: either proves the id); None for an unknown id."""
        entry = self.devices.get(device_id)
        if entry is None:
            return None
        if entry.previous is not None:
            return [entry.secret.reveal(), entry.previous.reveal()]
        return entry.secret.reveal()

    # ---- what links report ---------------------------------------------------------------
    def session_up(self, link: Any) -> None:
        """Link thread: its session has its host port: the device's record is up."""
        with self._lock:
            record = self._records.get(link.device_id or SHARED)
            if record is not None:
                record.started(link)
                link.record = record

    def session_ended(self, link: Any) -> None:
        """The uplink of a session ended: its bytes join the totals."""
        with self._lock:
            if link.record is None:
                return
            stats = link.stats()
            self.totals[0] += stats["bytes_received"]
            self.totals[1] += stats["bytes_sent"]
            link.record.ended(link, link.end_reason)

    def client_refused(self, link: Any) -> None:
        with self._lock:
            if link.record is not None:
                link.record.refused += 1

    def fought(self, link: Any, now: float) -> None:
        """The device's id answered on this node and on another at once."""
        with self._lock:
            record = link.record
            if record is not None:
                record.fights += 1
                record.fought_at = [t for t in record.fought_at if now - t < FIGHT_WINDOW]
                record.fought_at.append(now)

    def cooling(self, device_id: str, now: float) -> float:
        """Seconds a new session of `device_id` is refused here: its id fought
        FIGHT_LIMIT times within FIGHT_WINDOW (two devices with one id take each
        other's sessions over and over); 0.0: none."""
        with self._lock:
            record = self._records.get(device_id)
            if record is None or len(record.fought_at) < FIGHT_LIMIT:
                return 0.0
            return max(0.0, record.fought_at[-1] + FIGHT_WINDOW - now)

    def forwarded(self, device_id: str) -> None:
        """A client of the device went to the node holding it."""
        with self._lock:
            record = self._records.get(device_id)
            if record is not None:
                record.forwarded += 1

    def auth_failed(self, device_id: str, line: str) -> None:
        """A failed authentication as `device_id`: its table shows it."""
        with self._lock:
            record = self._records.get(device_id) if device_id else None
            if record is not None:
                record.auth_failures += 1
                record.last_error = line

    # ---- what status reads ---------------------------------------------------------------
    def record_links(self) -> List[Any]:
        """The live sessions of the configured devices and of [server] host."""
        with self._lock:
            return [r.link for r in self._records.values() if r.link is not None]

    def counts(self) -> Tuple[int, int]:
        """(configured devices, of them up)."""
        with self._lock:
            records = [r for ident, r in self._records.items() if ident != SHARED]
            return len(records), sum(1 for r in records if r.link is not None)

    def link_of(self, device_id: str) -> Any:
        with self._lock:
            record = self._records.get(device_id)
            return record.link if record is not None else None

    def rows(self, ports: Any) -> List[Dict[str, Any]]:
        """The device table: every configured device, then the session on [server] host
        (id ":legacy") while it is up; addresses as `ports` has them bound."""
        with self._lock:
            rows = []
            for ident, record in sorted(self._records.items()):
                if ident == SHARED and record.link is None:
                    continue
                owner = "" if ident == SHARED else ident
                rows.append(record.row(self.host_for(owner), ports.bound_for(owner, record.link)))
                services = self.services_of(ident) if ident != SHARED else {}
                if services:   # "NAME=ADDR:PORT, ...": bound while up, else as configured
                    rows[-1]["services"] = ", ".join(
                        "%s=%s" % (name, _address(ports.bound_for("%s/%s" % (ident, name),
                                                                  record.link))
                                   or services[name]) for name in sorted(services))
            return rows


def _address(address: Any) -> str:
    return format_hostport(*address[:2]) if address else ""
