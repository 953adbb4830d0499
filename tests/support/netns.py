"""Network namespaces for the device and the server, joined through a router, and the
faults a path can have.

    with NetPair() as net:              # or netpair_or_skip() in a test
        net.shape("1mbit")              # tc tbf on the router, each way: a cellular rate
        net.silent()                    # the router drops everything, both ways
        net.restore()                   # back to the shaping (or none)
        net.link("dev", False)          # ip link set DEV down on the device side: a flap

    ns dev (10.201.X.1) =veth= ns mid (router) =veth= ns srv (10.202.X.1)

Each end is a veth pair to the router namespace `mid`, which forwards; the
faults live there, in the path, not on either end.  That matters: a packet
dropped by the sender's own qdisc is "local congestion" to its kernel, which
then never counts a keepalive probe as lost (tcp_keepalive_timer retries
without end), so a drop on an end's own egress is not a silent network.
X comes from the pid, so parallel runs do not meet.  Processes run in a
namespace through `ip netns exec` (net.wrap(side) is the argv prefix); this
process opens sockets in one with net.call(side, fn): fn runs in a thread
moved there with setns(2), and a socket keeps the namespace it was made in.

What works on this kernel (no netem, no gact/matchall actions, no
iptables/nft): tbf shapes; tbf with a 1-byte bucket is the "silent path"
(every packet is larger than the bucket, so tbf drops it: the NAT mapping is
gone while both ends keep their TCP state); `ip link set down` flaps.  Names
end in the pid, and close() removes everything even when a test failed half way.
"""

import ctypes
import os
import subprocess
import threading
from typing import Any, Callable, List, Optional

CLONE_NEWNET = 0x40000000
SHAPE_BURST = "32kbit"      # the bucket of the cellular rate: a few packets
SILENT = ["tbf", "rate", "1kbit", "burst", "1", "limit", "1"]


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here (not root, no `ip`, no veth): the reason."""


def _run(argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=20)
    if check and proc.returncode:
        raise NetnsUnavailable("`%s` failed: %s" % (" ".join(argv), proc.stdout.strip()))
    return proc


class NetPair:
    """Namespaces `dev`, `mid` (the router) and `srv`; veth dev <-> mid <-> srv."""

    def __init__(self, tag: Optional[str] = None):
        tag = tag or "f%d" % os.getpid()
        octet = os.getpid() % 200 + 20
        self.ns = {side: tag + side for side in ("dev", "mid", "srv")}
        self.ifname = {"dev": tag + "d", "srv": tag + "s"}     # the ends' interfaces
        self.router_if = {"dev": tag + "md", "srv": tag + "ms"}  # the router's, towards each end
        self.addr = {"dev": "10.201.%d.1" % octet, "srv": "10.202.%d.1" % octet}
        self.gateway = {"dev": "10.201.%d.254" % octet, "srv": "10.202.%d.254" % octet}
        self.shaping: Optional[str] = None
        self._made: List[str] = []
        self._libc: Any = None

    # ---- lifecycle ----------------------------------------------------------------
    def open(self) -> "NetPair":
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        try:
            for name in self.ns.values():
                _run(["ip", "netns", "add", name])
                self._made.append(name)
            self.ip("mid", "link", "set", "lo", "up")
            _run(self.wrap("mid") + ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            for side in ("dev", "srv"):
                _run(["ip", "link", "add", self.ifname[side], "netns", self.ns[side], "type", "veth",
                      "peer", "name", self.router_if[side], "netns", self.ns["mid"]])
                self.ip(side, "addr", "add", self.addr[side] + "/24", "dev", self.ifname[side])
                self.ip("mid", "addr", "add", self.gateway[side] + "/24", "dev", self.router_if[side])
                self.ip(side, "link", "set", self.ifname[side], "up")
                self.ip(side, "link", "set", "lo", "up")
                self.ip("mid", "link", "set", self.router_if[side], "up")
                self.ip(side, "route", "add", "default", "via", self.gateway[side])
        except (NetnsUnavailable, OSError) as exc:
            self.close()
            raise NetnsUnavailable(str(exc)) from None
        return self

    def close(self) -> None:
        # Deleting a namespace deletes its veth ends, and with them their peers.
        for name in self._made:
            _run(["ip", "netns", "del", name], check=False)
        self._made = []

    def __enter__(self) -> "NetPair":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- commands in a namespace ------------------------------------------------------
    def wrap(self, side: str) -> List[str]:
        """The argv prefix that runs a command in `side`'s namespace."""
        return ["ip", "netns", "exec", self.ns[side]]

    def ip(self, side: str, *args: str) -> None:
        _run(["ip", "-n", self.ns[side]] + list(args))

    def tc(self, side: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.wrap(side) + ["tc"] + list(args), check=check)

    def call(self, side: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a fresh thread inside `side`'s namespace (sockets it makes stay there)."""
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        box: List[Any] = []

        def inside() -> None:
            try:
                fd = os.open("/var/run/netns/" + self.ns[side], os.O_RDONLY)
                try:
                    if self._libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns " + self.ns[side])
                finally:
                    os.close(fd)
                box.append((True, fn(*args)))
            except BaseException as exc:   # handed to the caller
                box.append((False, exc))

        thread = threading.Thread(target=inside, name="netns-" + side, daemon=True)
        thread.start()
        thread.join(60)
        if not box:
            raise TimeoutError("netns call in %s did not return" % side)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # ---- faults (all on the router: the ends see only what a network does) ---------------
    def _router_qdisc(self, spec: Optional[List[str]]) -> None:
        for side in ("dev", "srv"):
            if spec is None:
                self.tc("mid", "qdisc", "del", "dev", self.router_if[side], "root", check=False)
            else:
                self.tc("mid", "qdisc", "replace", "dev", self.router_if[side], "root", *spec)

    def shape(self, rate: Optional[str]) -> None:
        """tc tbf at `rate` (e.g. "1mbit") each way; None: no shaping."""
        self.shaping = rate
        self.restore()

    def restore(self) -> None:
        """The path as shaped: the end of a silent period."""
        self._router_qdisc(None if self.shaping is None else
                           ["tbf", "rate", self.shaping, "burst", SHAPE_BURST, "latency", "400ms"])

    def silent(self) -> None:
        """The router drops every packet both ways; both ends keep their TCP state."""
        self._router_qdisc(SILENT)

    def link(self, side: str, up: bool) -> None:
        """ip link set (the interface of `side`) up or down: a flap.  Up again, the
        default route comes back too (the kernel drops it with the link, as a
        DHCP or PPP client would put it back)."""
        self.ip(side, "link", "set", self.ifname[side], "up" if up else "down")
        if up:
            self.ip(side, "route", "replace", "default", "via", self.gateway[side])

    def dropped(self) -> int:
        """Packets the router's qdiscs dropped (tc -s), for the record."""
        total = 0
        for side in ("dev", "srv"):
            out = self.tc("mid", "-s", "qdisc", "show", "dev", self.router_if[side], check=False).stdout
            words = out.replace(",", " ").replace("(", " ").split()
            if "dropped" in words:
                total += int(words[words.index("dropped") + 1])
        return total


def netpair_or_skip() -> NetPair:
    import pytest   # here: scripts use this module without pytest
    try:
        return NetPair().open()
    except NetnsUnavailable as exc:
        pytest.skip("network namespaces unavailable: %s" % exc)
