"""The fleet's records: one per configured device (and one for the session on
[server] host), kept across its sessions, for `devices`, /api/devices and
/metrics.  Only configured ids get a record, so guessed ids grow nothing.
"""

import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .link import ServerLink

# The record of the session on [server] host (legacy, or v2 without identity).
# A colon is no id character, so no device can be named so.
SHARED = ":legacy"


class DeviceRecord:
    """What survives a device's sessions.  Under the app's lock."""

    __slots__ = ("id", "link", "since", "source", "sessions", "auth_failures", "refused",
                 "bytes_up", "bytes_down", "last_error")

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.link: Optional["ServerLink"] = None   # the live session, if any
        self.since: Optional[float] = None         # wall clock of its start
        self.source = ""                           # ADDR:PORT of the latest session
        self.sessions = 0                          # sessions started
        self.auth_failures = 0
        self.refused = 0                           # clients refused (limits)
        self.bytes_up = 0                          # from the device, ended sessions
        self.bytes_down = 0                        # to the device, ended sessions
        self.last_error = ""

    def started(self, link: "ServerLink") -> None:
        self.link = link
        self.since = time.time()
        self.source = link.name.split(" ", 1)[-1]
        self.sessions += 1

    def ended(self, link: "ServerLink", reason: str) -> None:
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
