"""What the server does with handshakes that fail or pass: one line each, counted,
the failing id slowed down from its source (server.throttle), and whether
device certificates are asked for.  Links report here from their threads."""

import threading
import time
from typing import Any

from .throttle import AuthThrottle


class Auth:
    def __init__(self, fleet: Any, uplink_log: Any, client_certificates: bool) -> None:
        self._fleet = fleet              # the records that show a configured id's failures
        self._log = uplink_log           # per-source lines
        self.throttle = AuthThrottle()
        self.failures = 0
        self._lock = threading.Lock()
        # [server] tls_client_ca: a device's certificate must name the id it proves.
        self.client_certificates = client_certificates

    def delay(self, source: Any, device_id: str, now: float) -> float:
        """How long a HELLO naming `device_id` from `source` waits for its CHALLENGE."""
        return self.throttle.delay(source, device_id, now)

    def failed(self, link: Any, device_id: str, message: str) -> None:
        """One line per failure, naming the id and the source.  A failure that named
        an id (a guess at its secret, maybe) slows that id down from its source."""
        with self._lock:
            self.failures += 1
        self._fleet.auth_failed(device_id, "%s: authentication failed: %s" % (link.name, message))
        if not device_id:
            self._log.warning(link.source, "%s: device without id refused: %s",
                              link.name, message)
            return
        penalty = self.throttle.failed(link.source, device_id, time.monotonic())
        self._log.warning(link.source, "%s: device %s refused: %s (its next try from this "
                          "address waits %.1f s)", link.name, device_id, message, penalty)

    def passed(self, link: Any, device_id: str) -> None:
        """The session proved `device_id`'s secret: that id's failures from its
        source are forgotten."""
        self.throttle.succeeded(link.source, device_id)
