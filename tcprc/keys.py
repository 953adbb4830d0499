"""Every key of the [device] and [server] tables: its type, default, check, doc, and
when a change of it applies. The settings types (tcprc.settings) are made from
these tables and ops.config builds its SCHEMA from them, so a key is added here
once (and documented in its sample config, etc/, which a test checks).

The uplink keys both ends have are LINK_KEYS, in both tables. The other tables
([console], [control], [log], [cluster]) only ops reads: they are in ops.config.
Base layer: this imports nothing of tcprc but addr.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional

from .addr import parse_hostport, parse_network

# When a changed value takes effect in a running agent (`config set`, SIGHUP):
LIVE = "live"          # at once; nothing restarts
SESSION = "session"    # by restarting what it affects: the device's tunnel; on the
                       # server the sessions that use it (its host port, its device)
NEW = "new"            # for the uplinks that dial in from now on; live sessions keep theirs
RESTART = "restart"    # at the next start of the agent: until then the running value stays
APPLIES = (LIVE, SESSION, NEW, RESTART)


class Key(NamedTuple):
    type: Any           # a type, or a tuple of the types a value may have
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ""
    applies: str = ""    # one of APPLIES (a test checks that every key has one)


def hostport(allow_empty: bool, bind: bool = False) -> Callable[[Any], Optional[str]]:
    """ADDR:PORT.  Addresses we listen on (`bind`) may omit the host (all
    interfaces) and use port 0 (any free port); addresses we dial may not."""
    def check(value: Any) -> Optional[str]:
        if value == "" and allow_empty:
            return None
        try:
            parse_hostport(value, allow_empty_host=bind, allow_zero_port=bind)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def hostport_list(value: Any) -> Optional[str]:
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"ADDR:PORT\", got %r" % (item,)
        problem = hostport(False)(item)
        if problem:
            return problem
    return None


MAX_SERVERS = 16   # [device] server entries: each is a dial in every round


def servers(value: Any) -> Optional[str]:
    """[device] server: "ADDR:PORT" ("": none), or a list of them tried in order."""
    if isinstance(value, str):
        return hostport(True)(value)
    if len(value) > MAX_SERVERS:
        return "lists %d servers: at most %d" % (len(value), MAX_SERVERS)
    for number, item in enumerate(value, 1):
        if not isinstance(item, str):
            return "entry %d must be a string \"ADDR:PORT\", got %r" % (number, item)
        problem = hostport(False)(item)
        if problem:
            return "entry %d: %s" % (number, problem)
        if item in value[:number - 1]:
            return "entry %d: %s is listed twice" % (number, item)
    return None


def network_list(value: Any) -> Optional[str]:
    if not value:
        return "must name at least one network (CIDR), got an empty list"
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"ADDR/PREFIX\", got %r" % (item,)
        try:
            parse_network(item)
        except ValueError as exc:
            return str(exc)
    return None


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def host_names(value: Any) -> Optional[str]:
    """[server] http_hosts: NAME, NAME:PORT, [IPV6] or [IPV6]:PORT each."""
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"NAME\" or \"NAME:PORT\", got %r" % (item,)
        name = item
        if item.startswith("[") and item.endswith("]"):
            name = item[1:-1]
        elif item.startswith("[") or item.count(":") == 1:
            try:
                name, _ = parse_hostport(item, allow_empty_host=False)
            except ValueError as exc:
                return str(exc)
        elif ":" in item:
            return "an IPv6 address goes in brackets ([::1] or [::1]:9100), got %r" % item[:80]
        chars = "0123456789abcdefABCDEF:." if item.startswith("[") else _NAME_CHARS
        if not 0 < len(name) <= 253 or not frozenset(chars).issuperset(name):
            return "%r is not a host name (letters, digits, . - _) or [IPV6]" % item[:80]
    return None


def between(low: float, high: float) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if not low <= value <= high:
            return "must be between %s and %s, got %s" % (low, high, value)
        return None
    return check


def one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if value not in choices:
            return "must be one of %s, got %r" % (", ".join(choices), value)
        return None
    return check


def wire_address(value: Any) -> Optional[str]:
    """CONNECT carries the address as ASCII; anything else would be refused by the device."""
    if not all(33 <= ord(c) < 127 for c in value) or len(value) > 255:
        return "must be ASCII without spaces, at most 255 characters, got %r" % value
    return None


ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_ID = 64


def identity(allow_empty: bool) -> Callable[[Any], Optional[str]]:
    """A v2 identity: what HELLO can carry (v2.md)."""
    def check(value: Any) -> Optional[str]:
        if value == "" and allow_empty:
            return None
        if not 0 < len(value) <= MAX_ID or not ID_CHARS.issuperset(value):
            return ("must be 1 to %d characters of A-Z a-z 0-9 . _ -, got %r"
                    % (MAX_ID, value[:MAX_ID + 8]))
        return None
    return check


_HEX = frozenset("0123456789abcdef")


def normal_fingerprint(value: str) -> Optional[str]:
    """"sha256:" + 64 hex digits (colons between pairs allowed) -> lower case without colons."""
    kind, _, digits = value.partition(":")
    if kind.lower() != "sha256":
        return None
    if ":" in digits:
        pairs = digits.split(":")
        if any(len(pair) != 2 for pair in pairs):
            return None
        digits = "".join(pairs)
    digits = digits.lower()
    if len(digits) != 64 or not _HEX.issuperset(digits):
        return None
    return "sha256:" + digits


def fingerprint(value: Any) -> Optional[str]:
    if value and normal_fingerprint(value) is None:
        return "must be \"sha256:\" and 64 hex digits (colons between pairs allowed), got %r" % (
            value[:120],)
    return None


# The uplink keys both ends have: liveness and per-stream buffering of the uplink.
# What a Link reads (settings.LinkSettings). A change reaches each role as
# LINK_APPLIES says, unless the key says otherwise.
LINK_KEYS: Dict[str, Key] = {
    "keepalive_idle": Key(int, 60, between(1, 7200), "seconds of uplink silence before TCP keepalive probes"),
    "keepalive_interval": Key(int, 10, between(1, 600), "seconds between keepalive probes"),
    "keepalive_count": Key(int, 5, between(1, 50), "unanswered probes before the uplink is declared dead"),
    "send_timeout": Key(float, 60.0, between(1, 3600), "seconds a frame may wait on a congested uplink before it is declared dead"),
    "stream_buffer": Key(int, 262144, between(4096, 16 * 1024 * 1024), "bytes queued for one slow local socket before the uplink stops reading"),
    "stall_timeout": Key(float, 30.0, between(0.1, 3600), "seconds a stream over its buffer may make no progress before it is closed (legacy sessions)"),
    "window": Key(int, 262144, between(16384, 16 * 1024 * 1024), "bytes a peer may send on one stream before this end returns credit (protocol v2)"),
    "heartbeat_interval": Key(float, 15.0, between(1, 3600), "seconds between PINGs on a v2 uplink"),
    "heartbeat_timeout": Key(float, 45.0, between(2, 86400), "seconds without any frame from the peer before a v2 uplink is ended; must exceed heartbeat_interval"),
}

# The device redials with a changed link key (DeviceApp restarts the tunnel); the
# server hands its settings to each uplink it accepts, so a live session keeps its own.
LINK_APPLIES = {"device": SESSION, "server": NEW}


def link_keys(role: str) -> Dict[str, Key]:
    """LINK_KEYS with when each applies on `role`."""
    return {name: key if key.applies else key._replace(applies=LINK_APPLIES[role])
            for name, key in LINK_KEYS.items()}


# [device]: what DeviceApp.apply_settings does with a change: the keys it needs
# a new uplink for restart the tunnel (device/app derives them from here).
DEVICE_KEYS: Dict[str, Key] = dict({
    "server": Key((str, list), "", servers, "ServerAddress:ServerPort, or a list of them tried in order (one uplink at a time; the next after a failed dial or a lost session); empty: wait for TCPRemoteConnect", SESSION),
    "local": Key(str, "127.0.0.1:23", hostport(False), "LocalAddress:LocalPort, the service clients reach", SESSION),
    "allow": Key(list, [], hostport_list, "further targets a CONNECT may name (default: only `local`)", SESSION),
    "autostart": Key(bool, True, None, "dial the server at start when `server` is set", RESTART),
    "connect_timeout": Key(float, 10.0, between(0.1, 300), "seconds to connect to the server or to a target", SESSION),
    "reconnect_min": Key(float, 1.0, between(0.01, 3600), "first reconnect delay, doubled per failure; at most reconnect_max", LIVE),
    "reconnect_max": Key(float, 60.0, between(0.01, 86400), "cap of the reconnect delay", LIVE),
    "healthy_after": Key(float, 30.0, between(0.1, 86400), "seconds up after which the reconnect delay resets", LIVE),
    "protocol": Key(str, "auto", one_of("auto", "legacy", "v2"), "auto: v2 when the server offers it, else legacy; legacy: never v2; v2: never legacy", SESSION),
    "id": Key(str, "", identity(True), "this device's identity on the server (v2); empty: none", SESSION),
    "secret": Key(str, "", None, "the shared secret of `id` (at least 128 bits); prefer secret_file", SESSION),
    "secret_file": Key(str, "", None, "file holding the secret (surrounding white space ignored); mode 0600: a file group or others may read is refused", SESSION),
    "allow_readable_secrets": Key(bool, False, None, "accept a secret_file, or a config file holding `secret`, that group or others may read (refused by default, as ssh refuses such a key)", LIVE),
    "tls": Key(bool, False, None, "wrap the uplink in TLS", SESSION),
    "tls_ca": Key(str, "", None, "PEM file of the CAs that sign the server's certificate; empty: the system's", SESSION),
    "tls_fingerprint": Key(str, "", fingerprint, "sha256:<64 hex digits> of the server's certificate, pinned instead of a CA (not together with tls_ca)", SESSION),
    "tls_server_name": Key(str, "", wire_address, "name the server's certificate must carry; empty: the host of `server`", SESSION),
    "tls_cert": Key(str, "", None, "PEM certificate this device shows the server (with tls_key)", SESSION),
    "tls_key": Key(str, "", None, "PEM private key of tls_cert", SESSION),
    "services": Key(dict, {}, None, "[device.services.NAME] tables: local (ADDR:PORT), where the server's service NAME of this device goes (protocol v2)", SESSION),
}, **link_keys("device"))

# [server]: what ServerApp.apply_settings does with a change.
SERVER_KEYS: Dict[str, Key] = dict({
    "listen": Key(str, "0.0.0.0:9000", hostport(False, bind=True), "ServerAddress:ServerPort where devices dial in", RESTART),
    "host": Key(str, "127.0.0.1:2222", hostport(False, bind=True), "HostAddress:HostPort where clients connect", SESSION),
    "listen_timeout": Key(float, 10.0, between(0.1, 3600), "seconds a new uplink may take to send LISTEN", NEW),
    "max_pending": Key(int, 64, between(1, 4096), "uplinks allowed to wait for their LISTEN at once; when full, the one waiting longest is dropped", LIVE),
    "max_pending_per_source": Key(int, 4, between(1, 4096), "of those, from one source address (an IPv6 /64); over it, that source's oldest is dropped", LIVE),
    "allow_from": Key(list, ["0.0.0.0/0", "::/0"], network_list, "networks (CIDR) devices may dial in from; the legacy protocol has no authentication", LIVE),
    "takeover": Key(bool, True, None, "a newer LISTEN replaces the live uplink (false: refuse the newcomer)", LIVE),
    "connect_address": Key(str, "127.0.0.1", wire_address, "address sent in CONNECT: a legacy device dials exactly it (with connect_port: 127.0.0.1:23 by default); a tcprc device takes \"\" or this default as its own `local`", SESSION),
    "connect_port": Key(int, 23, between(0, 65535), "port sent in CONNECT", SESSION),
    "id_quarantine": Key(float, 10.0, between(0.1, 600), "seconds at most a client id the server closed waits for the device's answering CLOSE before reuse, once the device is seen to answer (legacy Lua agents do); otherwise a few uplink round trips", NEW),
    "legacy": Key(bool, None, None, "identity-less (legacy) devices may dial in; absent: true without [server.devices.ID] tables and devices_dir, false with", NEW),
    "tls_cert": Key(str, "", None, "PEM certificate of the uplink listener (with tls_key); empty: no TLS", NEW),
    "tls_key": Key(str, "", None, "PEM private key of tls_cert", NEW),
    "tls_client_ca": Key(str, "", None, "PEM file of the CAs devices' certificates must be signed by; empty: none asked", NEW),
    "devices": Key(dict, {}, None, "[server.devices.ID] tables: host (ADDR:PORT, required), secret or secret_file, previous_secret or previous_secret_file (rotation), and [server.devices.ID.services.NAME] tables with a host each", SESSION),
    "devices_dir": Key(str, "", None, "directory of one ID.toml file per device (host, secret or secret_file, ...), read again on SIGHUP and every few seconds; empty: none", SESSION),
    "allow_readable_secrets": Key(bool, False, None, "accept secret files, and config or device files holding a secret, that group or others may read (refused by default)", LIVE),
    "max_streams_per_device": Key(int, 255, between(1, 255), "clients one device's session carries at once; over it a client is refused", NEW),
    "http": Key(str, "", hostport(True, bind=True), "ADDR:PORT of the status page, /api/devices and /metrics; empty: off (without http_token keep it on loopback)", LIVE),
    "http_hosts": Key(list, [], host_names, "more host names the status page answers to (NAME, or NAME:PORT for that port only) besides the address of `http`; another Host header is refused (DNS rebinding)", LIVE),
    "http_token": Key(str, "", None, "secret (at least 128 bits) the status page, /api/devices and /metrics require: Authorization: Bearer TOKEN, or HTTP basic auth with any user and TOKEN as password; empty: no login; prefer http_token_file", LIVE),
    "http_token_file": Key(str, "", None, "file holding http_token (surrounding white space ignored)", LIVE),
    "http_metrics_open": Key(bool, False, None, "serve /metrics without http_token (for a scraper that cannot log in)", LIVE),
}, **link_keys("server"))
