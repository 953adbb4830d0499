"""Fixtures and hooks only; the helpers live in tests/support (import them from there).

Real sockets on 127.0.0.1, real threads and processes, no mocks.
"""

import logging

import pytest

from support.agents import Agents
from support.etcd import EtcdCluster
from support.peers import LegacyServer
from support.services import Service
from support.tunnel import Apps, Tunnel, server_apps


@pytest.fixture(autouse=True)
def _log_info(caplog):
    """Capture tcprc's INFO lines too: uplink and client events are asserted on."""
    caplog.set_level(logging.INFO, logger="tcprc")


@pytest.fixture
def service():
    svc = Service("echo")
    yield svc
    svc.close()


@pytest.fixture
def tunnel(service):
    t = Tunnel(service.address)
    yield t
    t.close()


@pytest.fixture
def agents(tmp_path):
    a = Agents(tmp_path)
    yield a
    a.stop_all()


@pytest.fixture
def server():
    """server(**keys): a started ServerApp on free 127.0.0.1 ports, closed at the end."""
    apps = server_apps()
    yield apps
    apps.close()


@pytest.fixture
def legacy_server():
    """An emulated legacy server: a listener whose uplinks the test speaks by hand."""
    srv = LegacyServer()
    yield srv
    srv.close()


@pytest.fixture
def tcprc_device_on(legacy_server, service):
    """tcprc_device_on(**keys): a tcprc DeviceApp dialing `legacy_server`, its
    target the echo `service`; returns (app, the server's RawPeer) after LISTEN."""
    from tcprc.device.app import DeviceApp
    apps = Apps(DeviceApp, "device", server=legacy_server.address,
                local="%s:%d" % service.address, reconnect_min=0.05, reconnect_max=0.2)

    def start(**keys):
        app = apps(**keys)
        peer = legacy_server.accept()
        peer.expect(bytes.fromhex("00000400"))        # LISTEN, exactly
        return app, peer

    yield start
    apps.close()


@pytest.fixture(scope="module")
def etcd():
    """One real etcd member for a test module (skips where no etcd binary exists);
    test_cluster_e2e asks for three."""
    cluster = EtcdCluster(1)
    yield cluster
    cluster.close()
