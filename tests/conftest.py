"""Fixtures and hooks only; the helpers live in tests/support (import them from there).

Real sockets on 127.0.0.1, real threads and processes, no mocks.
"""

import logging

import pytest

from support.agents import Agents
from support.services import Service
from support.tunnel import Tunnel, server_apps


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
