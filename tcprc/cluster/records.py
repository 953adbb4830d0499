"""What the registry keeps in etcd, as bytes, and back: no I/O.

    /tcprc/<name>/nodes/<node>   {"peer", "http", "version", "devices", "instance"}
    /tcprc/<name>/devices/<id>   {"node", "session", "since", "source"}

Both are written under the writing server's lease.  Values come from etcd,
which others can write too: a value that does not decode is ignored (and
logged by the caller), never trusted.
"""

import hmac
import json
from typing import Any, Dict, Iterable, NamedTuple, Optional, Tuple

MAX_VALUE = 4096    # bytes of one value we decode; ours are ~200


class NodeInfo(NamedTuple):
    """A server of the cluster as its node key tells it."""
    name: str
    peer: str            # ADDR:PORT the others dial to forward a client
    http: str            # its status page, "" if none
    version: str
    devices: str         # digest of its device definitions (devices_digest)
    instance: str = ""   # random per process: two servers with one node name differ here
    local: bool = False  # this server itself


class ClaimRecord(NamedTuple):
    """Who holds a device's uplink, as the devices key tells it."""
    device_id: str
    node: str
    session: str         # random per uplink session
    since: float         # unix time the session authenticated
    source: str          # the device's ADDR:PORT as the holder saw it
    revision: int        # the key's mod_revision: the claim's epoch
    lease: int


class Keys:
    """The key names of one cluster."""

    def __init__(self, cluster: str):
        self.prefix = ("/tcprc/%s/" % cluster).encode("ascii")
        self.nodes = self.prefix + b"nodes/"
        self.devices = self.prefix + b"devices/"

    def node(self, name: str) -> bytes:
        return self.nodes + name.encode("ascii")

    def device(self, device_id: str) -> bytes:
        return self.devices + device_id.encode("ascii")

    def parse(self, key: bytes) -> Optional[Tuple[str, str]]:
        """("node", name) or ("device", id) of one of our keys; None for another key."""
        for kind, prefix in (("node", self.nodes), ("device", self.devices)):
            if key.startswith(prefix) and len(key) > len(prefix):
                try:
                    return kind, key[len(prefix):].decode("ascii")
                except UnicodeDecodeError:
                    return None
        return None


def _encode(doc: Dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _decode(value: bytes) -> Dict[str, Any]:
    if len(value) > MAX_VALUE:
        raise ValueError("a value of %d bytes" % len(value))
    doc = json.loads(value.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _text(doc: Dict[str, Any], key: str, required: bool = True) -> str:
    value = doc.get(key, None if required else "")
    if not isinstance(value, str):
        raise ValueError("%s is not a string" % key)
    return value


def encode_node(info: NodeInfo) -> bytes:
    return _encode({"peer": info.peer, "http": info.http, "version": info.version,
                    "devices": info.devices, "instance": info.instance})


def decode_node(name: str, value: bytes) -> NodeInfo:
    """ValueError when the value is not a node's."""
    doc = _decode(value)
    return NodeInfo(name, _text(doc, "peer"), _text(doc, "http", False),
                    _text(doc, "version", False), _text(doc, "devices", False),
                    _text(doc, "instance", False))


def encode_claim(node: str, session: str, since: float, source: str) -> bytes:
    return _encode({"node": node, "session": session, "since": round(since, 3),
                    "source": source})


def decode_claim(device_id: str, value: bytes, revision: int, lease: int) -> ClaimRecord:
    """ValueError when the value is not a claim."""
    doc = _decode(value)
    since = doc.get("since", 0)
    if not isinstance(since, (int, float)) or isinstance(since, bool):
        raise ValueError("since is not a number")
    node = _text(doc, "node")
    if not node:
        raise ValueError("node is empty")
    return ClaimRecord(device_id, node, _text(doc, "session"), float(since),
                       _text(doc, "source", False), revision, lease)


def devices_digest(secret: bytes, devices: Iterable[Any]) -> str:
    """What tells two servers' device definitions apart, and nothing more.

    `devices`: DeviceEntry-like (id, secret, host, previous, services).  The
    secrets count (two servers with different secrets for one device are
    misconfigured), under an HMAC keyed with the cluster secret: a reader of
    etcd learns nothing about them.  Of the hosts only the ports count: each
    server listens on its own addresses (10.0.0.1:2301 on one, 10.0.0.2:2301
    on the next) and that is no difference in the definitions.
    """
    mac = hmac.new(secret, b"tcprc cluster devices\0", "sha256")
    for entry in sorted(devices, key=lambda e: e.id):
        mac.update(_encode({
            "id": entry.id, "host": _port(entry.host),
            "services": {name: _port(host) for name, host in sorted(entry.services.items())},
            "secret": hmac.new(secret, entry.secret.reveal(), "sha256").hexdigest(),
            "previous": hmac.new(secret, entry.previous.reveal(), "sha256").hexdigest()
            if entry.previous is not None else ""}))
        mac.update(b"\n")
    return mac.hexdigest()[:32]


def _port(host: str) -> str:
    """The port of "ADDR:PORT" (or "[V6]:PORT")."""
    return host.rpartition(":")[2]

