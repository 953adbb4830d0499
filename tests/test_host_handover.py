"""The host port changes hands through the loop: a newcomer's link thread never waits
for the old uplink to stop (it used to, up to 5 s, in claim_host)."""

import socket
import threading

from support.net import is_eof
from support.peers import RawPeer, legacy_device
from support.waiting import wait_for
from tcprc.wire.frames import CONNECT, LISTEN


def _hold_link_thread(link):
    """Keep `link`'s thread busy until the returned event is set."""
    gate, entered = threading.Event(), threading.Event()

    def busy():
        entered.set()
        gate.wait(20)
    link.loop.call_soon(busy)
    assert entered.wait(10)
    return gate


def _slot(app):
    """The [server] host port's slot: its listener, holder and successor."""
    return app.ports._slots.get("")


def _newcomer(app, old_link):
    return wait_for(lambda: [l for l in list(app._links) if l is not old_link and l.listening],
                    what="the newcomer's LISTEN")[0]


def test_the_newcomer_serves_on_while_the_old_uplink_is_slow_to_stop(server):
    app = server()
    old = legacy_device(app)
    old_link, old_port = app.link_on(), app.host_address
    gate = _hold_link_thread(old_link)   # the old link cannot stop yet
    try:
        new = RawPeer(socket.create_connection(app.listen_address))
        new.send(LISTEN, 0)
        newcomer = _newcomer(app, old_link)
        answered = threading.Event()
        newcomer.loop.call_soon(answered.set)
        assert answered.wait(2), "the newcomer's link thread is blocked"
        assert app.host_address == old_port and app.link_on() is old_link
    finally:
        gate.set()
    assert is_eof(old.sock), "the old uplink is closed"
    wait_for(lambda: app.host_address and app.host_address != old_port, what="the port handed over")
    assert app.link_on() is newcomer
    client = socket.create_connection(app.host_address, timeout=10)
    assert new.read_frame()[0] == CONNECT
    client.close()
    new.close()


def test_a_newcomer_that_leaves_while_waiting_gets_nothing_and_leaks_nothing(server):
    app = server()
    old = legacy_device(app)
    old_link = app.link_on()
    gate = _hold_link_thread(old_link)
    try:
        new = RawPeer(socket.create_connection(app.listen_address))
        new.send(LISTEN, 0)
        newcomer = _newcomer(app, old_link)
        new.close()
        assert newcomer.wait_stopped(10)
    finally:
        gate.set()
    assert is_eof(old.sock)
    wait_for(lambda: app.host_address is None and _slot(app) is None, what="the port closed")
