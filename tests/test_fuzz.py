"""Fuzzing with a fixed seed and a small budget (scripts/fuzz runs the same targets for long).

Each target (tests/support/fuzz.py) states its property; here every target
gets a fixed number of inputs from seed FUZZ_SEED, so a failure replays.
"""

import logging

import pytest

from support import fuzz
from support.net import is_eof
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.wire import frames

FUZZ_SEED = 14
# Inputs per target: a few seconds in all on a loaded 2-core machine.  A
# server-link input costs about 1 s (the fresh device after it waits out the
# server's wait for a HELLO before it is taken as legacy): scripts/fuzz runs more.
BUDGET = {"decoder": 1500, "decoder-split": 60, "connect-payload": 20000, "console": 800,
          "commands": 4000, "config": 800, "device-link": 120, "server-link": 12,
          "handshake": 2000, "device-link-v2": 120, "server-link-v2": 100, "core-pair": 300}

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # Hostile frames make many warnings; the properties are checked, not the lines.
    caplog.set_level(logging.CRITICAL, logger="tcprc")


@pytest.mark.parametrize("target", fuzz.targets(), ids=lambda t: t.name)
def test_fuzz(target):
    try:
        outcome = fuzz.run(target, FUZZ_SEED, seconds=60, max_inputs=BUDGET[target.name])
    finally:
        getattr(target, "close", lambda: None)()
    assert outcome.tried == BUDGET[target.name]
    assert not outcome.failures, "%d of %d inputs failed; first: %s on %r" % (
        len(outcome.failures), outcome.tried, outcome.failures[0][1], outcome.failures[0][0])


# ---- regressions: what the fuzzers found, one test each -----------------------------------
@pytest.mark.parametrize("protocol", ["v2", "auto"])
def test_a_server_silent_after_its_offer_does_not_hold_the_device_for_ever(legacy_server, service, protocol):
    """Found by device-link-v2 (a second OFFER, then nothing): after an OFFER the
    device waited for CHALLENGE without a deadline, so a server (or a black hole
    on the path, TCP still up) that went quiet mid-handshake kept its uplink for ever."""
    from tcprc.device.app import DeviceApp
    device = DeviceApp(settings("device", server=legacy_server.address, protocol=protocol,
                                connect_timeout=0.5, reconnect_min=5, reconnect_max=5,
                                local="%s:%d" % service.address))
    device.start()
    try:
        peer = legacy_server.accept()
        peer.expect(b"\x00\x00\x04\x00")
        peer.send_raw(frames.OFFER_FRAME)
        assert peer.read_frame()[0] == frames.HELLO
        assert is_eof(peer.sock, timeout=5), "the device still waits for a CHALLENGE"
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert "the v2 handshake did not finish within 0.5 s of the OFFER" in error
    finally:
        device.close()


@pytest.mark.parametrize("role, raw", [
    ("server", {"server": {"tls_client_ca": "ca\x00.pem"}}),
    ("server", {"server": {"tls_cert": "a\x00", "tls_key": "b"}}),
    ("device", {"device": {"id": "gw1", "secret_file": "\x00"}}),
    ("server", {"server": {"devices": {"gw1": {"host": "127.0.0.1:2301", "secret_file": "s\x00"}}}}),
])
def test_a_file_path_with_a_nul_byte_is_one_config_error(role, raw):
    """Found by the config fuzzer (scripts/fuzz, seed 1414): open() raises
    ValueError, not OSError, for a path with a NUL byte, and it escaped the
    loader as a traceback instead of one ConfigError line."""
    from tcprc.errors import ConfigError
    from tcprc.ops.config import build_config
    with pytest.raises(ConfigError) as caught:
        build_config(role, raw, "fuzz.toml")
    assert "NUL byte" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("role, raw", [
    ("device", {"device": {"id": "gw1", "secret_file": "/no/such\ntls = false"}}),
    ("server", {"server": {"tls_client_ca": "/no/such\r\nca.pem"}}),
])
def test_a_file_path_with_a_newline_is_one_config_error_line(role, raw):
    """Found by the config fuzzer (scripts/fuzz, seed 1415: a multi-line TOML
    string as secret_file): the path went into the error as it was, newlines
    and all, so the "one line" error was several."""
    from tcprc.errors import ConfigError
    from tcprc.ops.config import build_config
    with pytest.raises(ConfigError) as caught:
        build_config(role, raw, "fuzz.toml")
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)
    assert "no such file" in str(caught.value)
