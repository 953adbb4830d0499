"""tcprc apps in this process: validated settings, a whole tunnel, app starters."""

import socket
from typing import Any, Callable, Dict, List, Optional

from tcprc.ops.config import build_config

from .net import HostPort
from .waiting import wait_for


def settings(role: str, **keys: Any) -> Any:
    """A validated settings section for `role`, from keyword overrides."""
    return getattr(build_config(role, {role: keys}, "test"), role)


def start_server(app_options: Optional[Dict[str, Any]] = None, **keys: Any) -> Any:
    """A started ServerApp, on free ports of 127.0.0.1 unless `keys` say otherwise;
    `app_options` go to ServerApp itself."""
    from tcprc.server.app import ServerApp
    app = ServerApp(settings("server", **dict({"listen": "127.0.0.1:0", "host": "127.0.0.1:0"}, **keys)),
                    **(app_options or {}))
    app.start()
    return app


def start_device(server_app: Any, target: HostPort, **keys: Any) -> Any:
    """A started DeviceApp that dials `server_app`, takes clients to `target`, and
    redials within half a second."""
    from tcprc.device.app import DeviceApp
    app = DeviceApp(settings("device", **dict({
        "server": "%s:%d" % server_app.listen_address, "local": "%s:%d" % target,
        "reconnect_min": 0.05, "reconnect_max": 0.5}, **keys)))
    app.start()
    return app


class Tunnel:
    """A ServerApp and a DeviceApp in this process, joined over 127.0.0.1."""

    def __init__(self, target: HostPort, server_keys: Optional[Dict[str, Any]] = None,
                 device_keys: Optional[Dict[str, Any]] = None):
        self.server = start_server(**(server_keys or {}))
        self.device = start_device(self.server, target, **(device_keys or {}))
        wait_for(lambda: self.server.host_address, what="the device's LISTEN")

    @property
    def host(self) -> HostPort:
        return self.server.host_address

    def client(self, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection(self.host, timeout=timeout)

    def close(self) -> None:
        self.device.close()
        self.server.close()


class Apps:
    """Apps started by a test (each from `base` keys plus its own), closed at its end."""

    def __init__(self, make: Callable[[Any], Any], role: str, **base: Any):
        self.make, self.role, self.base = make, role, base
        self.started: List[Any] = []

    def __call__(self, **keys: Any) -> Any:
        app = self.make(settings(self.role, **dict(self.base, **keys)))
        app.start()
        self.started.append(app)
        return app

    def close(self) -> None:
        for app in self.started:
            app.close()


def server_apps(**base: Any) -> Apps:
    """ServerApps listening on free ports of 127.0.0.1 unless told otherwise."""
    from tcprc.server.app import ServerApp
    return Apps(ServerApp, "server", **dict({"listen": "127.0.0.1:0", "host": "127.0.0.1:0"}, **base))
