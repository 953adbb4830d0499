"""A headless Chromium driven over the DevTools protocol (CDP), stdlib only.

For the status page's browser test and scripts/page-bench: a fresh profile,
no network besides what the page asks for, a websocket client just big
enough for CDP (text frames, client masking, fragments, ping), and the RSS
of the whole browser process tree from /proc.
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from .procfs import sample

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class WebSocket:
    """A client websocket (RFC 6455) for text messages."""

    def __init__(self, url: str, timeout: float = 30.0):
        assert url.startswith("ws://"), url
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET /%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n" % (path, hostport, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("websocket: closed during the handshake")
            head += chunk
        head, _, self._buffer = head.partition(b"\r\n\r\n")
        self._parts: List[bytes] = []
        if not head.startswith(b"HTTP/1.1 101"):
            raise OSError("websocket: %r" % head.split(b"\r\n", 1)[0])

    def _parse(self) -> Optional[Tuple[int, bytes]]:
        """The first whole frame in the buffer (its first byte, payload), taken out of
        it; None while it is incomplete.  A timeout in between loses nothing."""
        data = self._buffer
        if len(data) < 2:
            return None
        size, at = data[1] & 0x7F, 2
        if size == 126:
            if len(data) < 4:
                return None
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                return None
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        mask = None
        if data[1] & 0x80:
            mask, at = data[at:at + 4], at + 4
        if len(data) < at + size:
            return None
        payload, self._buffer = data[at:at + size], data[at + size:]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return data[0], payload

    def _frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        size = len(payload)
        if size < 126:
            head += bytes([0x80 | size])
        elif size < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", size)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", size)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._frame(1, text.encode())

    def recv(self) -> str:
        """The next text message; socket.timeout leaves the stream intact."""
        while True:
            frame = self._parse()
            if frame is None:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError("websocket closed")
                self._buffer += chunk
                continue
            first, payload = frame
            opcode = first & 0x0F
            if opcode == 8:
                raise EOFError("websocket closed by the browser")
            if opcode == 9:
                self._frame(10, payload)
            elif opcode in (0, 1, 2):
                self._parts.append(payload)
                if first & 0x80:
                    message, self._parts = b"".join(self._parts), []
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class Browser:
    """Headless Chromium on a fresh profile with one page target to drive.

    `call` sends a CDP command and returns its result; events seen meanwhile
    are kept in `events` (method, params)."""

    def __init__(self, chromium: str, extra: List[str] = (), timeout: float = 60.0):
        self.profile = tempfile.mkdtemp(prefix="tcprc-chromium-")
        self.proc = subprocess.Popen(
            [chromium] + FLAGS + list(extra) + ["--user-data-dir=%s" % self.profile,
                                                "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.events: List[Any] = []
        self._next = 0
        self._timeout = timeout
        self.ws: Optional[WebSocket] = None
        try:
            port = self._devtools_port(timeout)
            deadline = time.monotonic() + timeout
            while True:
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port,
                                            timeout=timeout) as answer:
                    pages = [t for t in json.loads(answer.read().decode()) if t["type"] == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if not pages:
                raise OSError("chromium shows no page target")
            self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"], timeout)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OSError("chromium exited with status %d" % self.proc.returncode)
            try:
                with open(path) as handle:
                    first = handle.readline().strip()
                if first:
                    return int(first)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise OSError("chromium wrote no DevToolsActivePort within %g s" % timeout)

    def send(self, method: str, **params: Any) -> int:
        """Send a CDP command without waiting for its answer; its id."""
        assert self.ws is not None
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        return self._next

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        """Send a CDP command and return its result (events meanwhile go to `events`)."""
        ident = self.send(method, **params)
        while True:
            message = self._message(None)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError("%s: %s" % (method, message["error"]))
                return message.get("result", {})
            if "method" in message:
                self.events.append((message["method"], message.get("params", {})))

    def event(self, *methods: str, timeout: float = 30.0) -> Any:
        """The next event (method, params) of one of `methods`, those seen before
        first; socket.timeout after `timeout` seconds without one."""
        for index, (method, params) in enumerate(self.events):
            if method in methods:
                del self.events[index]
                return method, params
        deadline = time.monotonic() + timeout
        while True:
            message = self._message(max(0.01, deadline - time.monotonic()))
            if message.get("method") in methods:
                return message["method"], message.get("params", {})
            if "method" in message:
                self.events.append((message["method"], message.get("params", {})))
            elif time.monotonic() > deadline:
                raise socket.timeout("no %s within %g s" % (" or ".join(methods), timeout))

    def _message(self, timeout: Optional[float]) -> Dict[str, Any]:
        assert self.ws is not None
        self.ws.sock.settimeout(timeout if timeout is not None else self._timeout)
        return json.loads(self.ws.recv())

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError("%s: %s" % (expression[:80], result["exceptionDetails"]))
        return result["result"].get("value")

    def rss_kb(self) -> int:
        """VmRSS summed over the browser's process tree (shared pages count once per process)."""
        return int(sample(self.proc.pid)["rss_kb"])

    def settled_rss_kb(self, limit: float = 15.0) -> int:
        """rss_kb once the browser's helper processes have started and the sum holds
        still (two samples 0.5 s apart within 1 %), or after `limit` seconds."""
        deadline = time.monotonic() + limit
        last = self.rss_kb()
        while True:
            time.sleep(0.5)
            now = self.rss_kb()
            if abs(now - last) <= last / 100 or time.monotonic() > deadline:
                return now
            last = now

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for _ in range(20):   # its helper processes may still write there for a moment
            shutil.rmtree(self.profile, ignore_errors=True)
            if not os.path.exists(self.profile):
                break
            time.sleep(0.1)
