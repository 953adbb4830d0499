"""ADDR:PORT parsing and dialing."""

import socket

import pytest

from support.fresh import python_output
from tcprc.addr import format_hostport, parse_hostport, ports_collide
from tcprc.engine.sockets import connect_tcp


def test_parse_and_format_round_trip():
    for text, parsed in (("127.0.0.1:23", ("127.0.0.1", 23)), ("[::1]:22", ("::1", 22)),
                         ("gw.example:8080", ("gw.example", 8080))):
        assert parse_hostport(text) == parsed
        assert format_hostport(*parsed) == text


@pytest.mark.parametrize("bad", ["", "127.0.0.1", "::1:22", "[::1]22", "host:0", "host:70000",
                                 "host:x", "ho st:22"])
def test_bad_addresses_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError):
        parse_hostport(bad)


@pytest.mark.parametrize("first, second, collide", [
    ("127.0.0.1:2301", "127.0.0.1:2301", True),
    ("127.0.0.1:2301", "127.0.0.2:2301", False),      # another address, same port: both bind
    ("127.0.0.1:2301", "127.0.0.1:2302", False),
    ("0.0.0.0:2301", "127.0.0.1:2301", True),         # a wildcard takes every address
    ("127.0.0.1:2301", ":2301", True),
    ("[::]:2301", "127.0.0.1:2301", True),
    ("[::1]:2301", "[::1]:2301", True),
    ("[::1]:2301", "127.0.0.1:2301", False),
    ("127.0.0.1:0", "127.0.0.1:0", False),            # port 0: a free port each
    ("0.0.0.0:0", "127.0.0.1:0", False),
])
def test_one_collision_rule_for_every_listening_port(first, second, collide):
    assert ports_collide(first, second) is collide
    assert ports_collide(second, first) is collide


@pytest.mark.e2e
def test_dialing_an_ascii_host_does_not_load_the_idna_codec():
    # A str host makes getaddrinfo load encodings.idna, unicodedata and
    # stringprep (about 400 KB of RSS); the device dials without them.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        code = ("import sys; from tcprc.engine.sockets import connect_tcp\n"
                "connect_tcp('127.0.0.1', %d, 5).close()\n"
                "connect_tcp('localhost', %d, 5).close()\n"
                "print(sorted(m for m in ('encodings.idna', 'unicodedata', 'stringprep')"
                " if m in sys.modules))" % ((listener.getsockname()[1],) * 2))
        assert python_output(code, timeout=30).strip() == "[]"
    finally:
        listener.close()


def test_a_non_ascii_name_still_resolves_through_idna():
    # Not an encoding error: the name goes to the resolver, which finds nothing.
    with pytest.raises(OSError) as caught:
        connect_tcp("bücher.invalid", 9, 2)
    assert not isinstance(caught.value, UnicodeError)
