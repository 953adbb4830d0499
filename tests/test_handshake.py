"""The protocol v2 handshake (tcprc.wire.handshake): both state machines, every
REJECT code they produce, replays, and nothing secret in what they say."""

import pytest

from tcprc.errors import PeerError
from tcprc.wire import frames as p
from tcprc.wire.handshake import (DeviceHandshake, HandshakeError, device_proof, server_proof,
                                  valid_device_id)
from tcprc.wire.server_handshake import ServerHandshake

SECRET = b"s3cret-of-gw17-for-tests"
OTHER = b"another-secret-of-22-chars"
DEVICES = {"gw-17": SECRET, "gw-18": OTHER}


def server(legacy_allowed=True, window=65536, nonce=None):
    return ServerHandshake(DEVICES.get, window, legacy_allowed, nonce=nonce)


def device(device_id="gw-17", secret=SECRET, window=32768, nonce=None):
    return DeviceHandshake(device_id, secret, window, nonce=nonce)


def fails(code, call, *args):
    with pytest.raises(HandshakeError) as caught:
        call(*args)
    assert caught.value.code == code, str(caught.value)
    assert "\n" not in str(caught.value) and "\n" not in caught.value.wire_text
    return str(caught.value)


def refused_on_the_wire(call, *args):
    """What the server logs and the REJECT payload it sends for a failed AUTH."""
    with pytest.raises(HandshakeError) as caught:
        call(*args)
    return str(caught.value), p.encode_reject(caught.value.code, caught.value.wire_text)


def exchange(dev, srv, host="0.0.0.0:2201"):
    """A whole handshake; the host the device was told."""
    srv.on_auth(dev.on_challenge(srv.on_hello(dev.hello())))
    return dev.on_welcome(srv.welcome(host))


def test_a_device_with_its_secret_is_welcomed_and_both_learn_the_windows():
    dev, srv = device(), server(legacy_allowed=False)
    assert exchange(dev, srv) == "0.0.0.0:2201"
    assert srv.done and srv.authenticated and srv.device_id == "gw-17"
    assert srv.peer_window == 32768 and dev.peer_window == 65536
    assert dev.host == "0.0.0.0:2201"


def test_the_device_proves_first_and_the_server_proves_in_welcome():
    dev, srv = device(), server()
    hello = dev.hello()
    challenge = srv.on_hello(hello)
    assert len(challenge) == 37 and p.decode_challenge(challenge)[1] == 65536   # no proof in it
    auth = dev.on_challenge(challenge)
    assert auth == b"\x20" + device_proof(SECRET, hello, challenge)
    srv.on_auth(auth)
    welcome = srv.welcome("0.0.0.0:2201")
    assert p.decode_welcome(welcome) == (server_proof(SECRET, hello, challenge, auth),
                                         "0.0.0.0:2201")
    assert dev.on_welcome(welcome) == "0.0.0.0:2201"


def test_a_device_without_id_is_welcomed_anonymously_when_legacy_is_allowed():
    dev, srv = device("", None), server(legacy_allowed=True)
    auth = dev.on_challenge(srv.on_hello(dev.hello()))
    assert auth == b"\x00"
    srv.on_auth(auth)
    assert srv.done and not srv.authenticated and srv.device_id == ""
    welcome = srv.welcome("0.0.0.0:2201")
    assert p.decode_welcome(welcome) == (b"", "0.0.0.0:2201")
    assert dev.on_welcome(welcome) == "0.0.0.0:2201"


def test_a_device_without_id_is_refused_when_the_server_requires_identity():
    message = fails(p.REJECT_IDENTITY_REQUIRED, server(legacy_allowed=False).on_hello,
                    device("", None).hello())
    assert message == "HELLO without id: this server requires one"


def test_an_unknown_id_is_challenged_like_a_known_one():
    # Same nonce, same window: the CHALLENGE bytes are the same, known id or not.
    known = server(nonce=bytes(range(32))).on_hello(device("gw-17", nonce=bytes(32)).hello())
    unknown_srv = server(nonce=bytes(range(32)))
    unknown = unknown_srv.on_hello(device("gw-99", nonce=bytes(32)).hello())
    assert unknown == known and len(unknown) == 37
    assert unknown_srv.device_id == "gw-99" and not unknown_srv.done


def test_an_unknown_id_and_a_bad_proof_give_the_same_reject_and_only_the_log_differs():
    unknown_dev, unknown_srv = device("gw-99"), server()
    unknown_auth = unknown_dev.on_challenge(unknown_srv.on_hello(unknown_dev.hello()))
    unknown_log, unknown_wire = refused_on_the_wire(unknown_srv.on_auth, unknown_auth)
    wrong_dev, wrong_srv = device(secret=OTHER), server()
    wrong_auth = wrong_dev.on_challenge(wrong_srv.on_hello(wrong_dev.hello()))
    wrong_log, wrong_wire = refused_on_the_wire(wrong_srv.on_auth, wrong_auth)
    assert unknown_wire == wrong_wire == b"\x02authentication failed"
    assert unknown_log == "unknown id gw-99" and wrong_log == "bad proof for id gw-17"
    assert unknown_srv.device_id == "gw-99" and wrong_srv.device_id == "gw-17"
    assert not (unknown_srv.authenticated or wrong_srv.authenticated)


def test_an_unknown_id_fails_even_with_a_proof_under_an_empty_or_guessed_key():
    for key in (b"", SECRET, bytes(32)):
        dev, srv = device("gw-99"), server()
        hello = dev.hello()
        challenge = srv.on_hello(hello)
        fails(p.REJECT_BAD_PROOF, srv.on_auth, p.encode_auth(device_proof(key, hello, challenge)))


def test_a_proof_made_with_the_wrong_secret_is_refused_by_the_server():
    dev, srv = device(), server()
    hello = dev.hello()
    challenge = srv.on_hello(hello)
    forged = p.encode_auth(device_proof(OTHER, hello, challenge))
    assert fails(p.REJECT_BAD_PROOF, srv.on_auth, forged) == "bad proof for id gw-17"
    assert not srv.authenticated and not srv.done
    with pytest.raises(ValueError):
        srv.welcome("0.0.0.0:2201")             # no WELCOME, no proof_s, for a failed AUTH


@pytest.mark.parametrize("auth", [b"\x00", p.encode_auth(bytes(32))], ids=["none", "zeros"])
def test_an_id_without_a_valid_proof_is_refused(auth):
    srv = server()
    srv.on_hello(device().hello())
    fails(p.REJECT_BAD_PROOF, srv.on_auth, auth)


def test_a_device_with_the_wrong_secret_gets_no_proof_from_the_server():
    # The server says nothing computed from the secret before the device proved it.
    dev, srv = device(secret=OTHER), server()
    challenge = srv.on_hello(dev.hello())
    fails(p.REJECT_BAD_PROOF, srv.on_auth, dev.on_challenge(challenge))
    with pytest.raises(ValueError):
        srv.welcome("0.0.0.0:2201")


def test_a_server_with_the_wrong_secret_is_refused_by_the_device():
    # An impostor that knows the id, not the secret, skips its AUTH check and
    # signs WELCOME with what it has.
    dev, impostor = device(), ServerHandshake({"gw-17": OTHER}.get, 65536, True)
    hello = dev.hello()
    challenge = impostor.on_hello(hello)
    auth = dev.on_challenge(challenge)
    forged = p.encode_welcome("0.0.0.0:2201", server_proof(OTHER, hello, challenge, auth))
    assert fails(p.REJECT_BAD_PROOF, dev.on_welcome, forged) == \
        "the server failed to prove the secret for id gw-17 (wrong proof)"
    assert dev.host is None


def test_a_welcome_without_proof_for_an_identified_device_is_refused():
    dev, srv = device(), server()
    srv.on_auth(dev.on_challenge(srv.on_hello(dev.hello())))
    assert fails(p.REJECT_BAD_PROOF, dev.on_welcome, p.encode_welcome("0.0.0.0:2201")) == \
        "the server failed to prove the secret for id gw-17 (no proof in its WELCOME)"
    assert dev.host is None


def test_the_devices_proof_cannot_be_reflected_as_the_servers():
    dev, srv = device(), server()
    auth = dev.on_challenge(srv.on_hello(dev.hello()))
    fails(p.REJECT_BAD_PROOF, dev.on_welcome, p.encode_welcome("a:1", p.decode_auth(auth)))


def test_a_recorded_hello_and_auth_replayed_to_a_new_server_are_refused():
    dev, srv = device(), server()
    hello = dev.hello()
    auth = dev.on_challenge(srv.on_hello(hello))
    srv.on_auth(auth)                           # the original exchange succeeds
    replayed = server()                         # fresh nonce_s
    replayed.on_hello(hello)
    assert fails(p.REJECT_BAD_PROOF, replayed.on_auth, auth) == "bad proof for id gw-17"


def test_a_recorded_welcome_replayed_to_a_new_device_is_refused():
    dev, srv = device(), server()
    challenge = srv.on_hello(dev.hello())
    srv.on_auth(dev.on_challenge(challenge))
    welcome = srv.welcome("0.0.0.0:2201")
    assert dev.on_welcome(welcome) == "0.0.0.0:2201"
    # A fake server replays the recorded CHALLENGE and WELCOME to a device
    # with a fresh nonce_d: proof_s does not cover its HELLO.
    fresh = device()
    fresh.hello()
    fresh.on_challenge(challenge)
    assert fails(p.REJECT_BAD_PROOF, fresh.on_welcome, welcome) == \
        "the server failed to prove the secret for id gw-17 (wrong proof)"


def test_the_same_nonces_give_the_same_bytes_and_fresh_ones_differ():
    fixed = [bytes(32), bytes(range(32))]
    runs = []
    for nonces in (fixed, fixed, [None, None]):
        dev, srv = device(nonce=nonces[0]), server(nonce=nonces[1])
        hello = dev.hello()
        challenge = srv.on_hello(hello)
        auth = dev.on_challenge(challenge)
        srv.on_auth(auth)
        runs.append((hello, challenge, auth, srv.welcome("a:1")))
    assert runs[0] == runs[1]
    assert all(runs[2][n] != runs[0][n] for n in range(4))


def test_a_proof_sent_to_a_device_without_id_is_malformed():
    # The server sends proof_s only to a device that named an id.
    dev = device("", None)
    hello = dev.hello()
    challenge = p.encode_challenge(bytes(32), 65536)
    auth = dev.on_challenge(challenge)
    welcome = p.encode_welcome("a:1", server_proof(SECRET, hello, challenge, auth))
    assert fails(p.REJECT_MALFORMED, dev.on_welcome, welcome) == \
        "WELCOME carries a proof for a HELLO without id"


def test_a_proof_from_a_device_without_id_is_malformed():
    srv = server()
    srv.on_hello(device("", None).hello())
    fails(p.REJECT_MALFORMED, srv.on_auth, p.encode_auth(bytes(32)))


@pytest.mark.parametrize("hello,code", [
    (b"", p.REJECT_MALFORMED),
    (b"\x02\x00", p.REJECT_MALFORMED),
    (b"\x03" + bytes(40), p.REJECT_VERSION),
    (b"\x01", p.REJECT_VERSION),
    (bytes([2, 0]) + bytes(32) + b"\x00\x00\x80\x00\x05gw 17", p.REJECT_MALFORMED),
    (bytes([2, 0]) + bytes(32) + b"\x00\x00\x80\x00\x05gw-17" + b"\x00" * 60000, p.REJECT_MALFORMED),
], ids=["empty", "truncated", "version 3", "version 1", "bad id charset", "oversized"])
def test_a_bad_hello_is_refused_with_its_code(hello, code):
    srv = server()
    fails(code, srv.on_hello, hello)
    assert srv.device_id == ""


@pytest.mark.parametrize("cut", [0, 1, 20, 32])
def test_a_truncated_auth_is_malformed(cut):
    dev, srv = device(), server()
    auth = dev.on_challenge(srv.on_hello(dev.hello()))
    fails(p.REJECT_MALFORMED, srv.on_auth, auth[:cut])
    fails(p.REJECT_MALFORMED, server().on_hello, b"")      # and nothing leaks across objects


def test_an_oversized_auth_challenge_or_welcome_is_malformed():
    dev, srv = device(), server()
    challenge = srv.on_hello(dev.hello())
    auth = dev.on_challenge(challenge)
    fails(p.REJECT_MALFORMED, srv.on_auth, auth + b"\x00")
    again = device()
    again.hello()
    fails(p.REJECT_MALFORMED, again.on_challenge, challenge + b"\x00")
    later = device()
    later.hello()
    fails(p.REJECT_VERSION, later.on_challenge, b"\x03" + challenge[1:])
    good, srv = device(), server()
    srv.on_auth(good.on_challenge(srv.on_hello(good.hello())))
    fails(p.REJECT_MALFORMED, good.on_welcome, srv.welcome("a:1") + b"\x00")
    assert good.host is None


def test_the_server_enforces_the_order():
    assert fails(p.REJECT_MALFORMED, server().on_auth, b"\x00") == \
        "AUTH out of order: expected HELLO"
    dev, srv = device(), server()
    hello = dev.hello()
    srv.on_hello(hello)
    assert fails(p.REJECT_MALFORMED, srv.on_hello, hello) == "HELLO out of order: expected AUTH"
    # A failed handshake stays failed: a good AUTH afterwards is refused.
    assert fails(p.REJECT_MALFORMED, srv.on_auth, b"\x00") == \
        "AUTH out of order: expected nothing: the handshake failed"
    done = server()
    dev = device()
    done.on_auth(dev.on_challenge(done.on_hello(dev.hello())))
    assert fails(p.REJECT_MALFORMED, done.on_auth, b"\x00") == \
        "AUTH out of order: expected nothing more"
    with pytest.raises(ValueError):
        server().welcome("a:1")                 # our own mistake, not the peer's


def test_the_device_enforces_the_order():
    dev, srv = device(), server()
    assert fails(p.REJECT_MALFORMED, dev.on_challenge, b"") == \
        "CHALLENGE out of order: expected nothing before HELLO"
    dev = device()
    assert fails(p.REJECT_MALFORMED, dev.on_welcome, p.encode_welcome("a:1")) == \
        "WELCOME out of order: expected nothing before HELLO"
    dev = device()
    challenge = srv.on_hello(dev.hello())
    assert fails(p.REJECT_MALFORMED, dev.on_welcome, p.encode_welcome("a:1")) == \
        "WELCOME out of order: expected CHALLENGE"
    dev = device()
    srv = server()
    challenge = srv.on_hello(dev.hello())
    dev.on_challenge(challenge)
    assert fails(p.REJECT_MALFORMED, dev.on_challenge, challenge) == \
        "CHALLENGE out of order: expected WELCOME"
    fails(p.REJECT_MALFORMED, dev.on_welcome, b"\x00\x00\x03a:1\x00")
    assert dev.host is None


def test_handshake_errors_are_the_peers_fault():
    assert issubclass(HandshakeError, PeerError)


def test_nothing_secret_in_any_message_or_repr():
    said = []
    dev, srv = device(secret=OTHER), server()
    said += [repr(dev), repr(srv)]
    auth = dev.on_challenge(srv.on_hello(dev.hello()))
    said += [repr(dev), repr(srv)]
    stranger, unknown = device("gw-99"), server()
    for call, arg in ((srv.on_auth, auth),
                      (unknown.on_auth, stranger.on_challenge(unknown.on_hello(stranger.hello()))),
                      (dev.on_welcome, p.encode_welcome("a:1", bytes(32)))):
        try:
            call(arg)
        except HandshakeError as exc:
            said += [str(exc), repr(exc), exc.wire_text]
    said += [repr(dev), repr(srv), repr(unknown)]
    assert len(said) == 16
    for secret in (SECRET, OTHER):
        for form in (secret.decode(), secret.hex(), repr(secret)):
            assert not any(form in line for line in said), form


def test_secrets_need_128_bits():
    """The one rule, in ops.config (the wire layer trusts what the config let through)."""
    from tcprc.ops.config import secret_problem
    for weak in ("", "a" * 21, "0123456789abcdef" + "0" * 15, "f" * 31):
        problem = secret_problem(weak)
        assert problem and "shorter than 128 bits" in problem
        assert weak == "" or weak not in problem
    for strong in ("z" * 22, "0123456789abcdef" * 2, "0123456789ABCDEF" * 2):
        assert secret_problem(strong) is None, strong
    assert secret_problem("0" * 31 + "g") is None           # 32 characters, not all hex: >= 22
    assert secret_problem("0" * 31) is not None              # hex only: 31 < 32


def test_valid_device_id():
    assert valid_device_id("gw-17") and valid_device_id("A.b_c-9") and valid_device_id("x" * 64)
    for bad in ("", "x" * 65, "gw 17", "gw/17", "gw\t17", "gwé", "gw:17"):
        assert not valid_device_id(bad), bad


@pytest.mark.parametrize("args", [("gw 17", SECRET), ("gw-17", None), ("", SECRET),
                                  ("gw-17", b"")])
def test_a_device_handshake_needs_a_good_id_and_its_secret_together(args):
    with pytest.raises(ValueError):
        DeviceHandshake(args[0], args[1], 32768)


def test_a_nonce_must_be_32_bytes():
    with pytest.raises(ValueError):
        device(nonce=b"short")
    with pytest.raises(ValueError):
        server(nonce=bytes(33))
