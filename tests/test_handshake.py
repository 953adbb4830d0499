"""The protocol v2 handshake (tcprc.wire.handshake): both state machines, every
REJECT code they produce, replays, and nothing secret in what they say."""

import pytest

from tcprc.errors import PeerError
from tcprc.wire import frames as p
from tcprc.wire.handshake import (DeviceHandshake, HandshakeError, ServerHandshake,
                                  check_secret, device_proof, server_proof, valid_device_id)

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
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_device_with_its_secret_is_welcomed_and_both_learn_the_windows():
    dev, srv = device(), server(legacy_allowed=False)
    srv.on_auth(dev.on_challenge(srv.on_hello(dev.hello())))
    assert srv.done and srv.authenticated and srv.device_id == "gw-17"
    assert srv.peer_window == 32768 and dev.peer_window == 65536
    assert dev.on_welcome(p.encode_welcome("0.0.0.0:2201")) == "0.0.0.0:2201"
    assert dev.host == "0.0.0.0:2201"


def test_a_device_without_id_is_welcomed_anonymously_when_legacy_is_allowed():
    dev, srv = device("", None), server(legacy_allowed=True)
    challenge = srv.on_hello(dev.hello())
    assert p.decode_challenge(challenge)[2] == b""
    auth = dev.on_challenge(challenge)
    assert auth == b"\x00"
    srv.on_auth(auth)
    assert srv.done and not srv.authenticated and srv.device_id == ""


def test_a_device_without_id_is_refused_when_the_server_requires_identity():
    message = fails(p.REJECT_IDENTITY_REQUIRED, server(legacy_allowed=False).on_hello,
                    device("", None).hello())
    assert message == "HELLO without id: this server requires one"


def test_an_unknown_id_is_refused_with_code_1_naming_it():
    srv = server()
    assert fails(p.REJECT_UNKNOWN_ID, srv.on_hello, device("gw-99").hello()) == "unknown id gw-99"
    assert srv.device_id == "gw-99" and not srv.done


def test_a_device_with_the_wrong_secret_refuses_the_server_first():
    # The device checks proof_s before it proves anything itself.
    dev = device(secret=OTHER)
    challenge = server().on_hello(dev.hello())
    assert fails(p.REJECT_BAD_PROOF, dev.on_challenge, challenge) == \
        "the server failed to prove the secret for id gw-17 (wrong proof)"


def test_a_proof_made_with_the_wrong_secret_is_refused_by_the_server():
    dev, srv = device(), server()
    hello = dev.hello()
    challenge = srv.on_hello(hello)
    forged = p.encode_auth(device_proof(OTHER, hello, challenge))
    assert fails(p.REJECT_BAD_PROOF, srv.on_auth, forged) == "bad proof for id gw-17"
    assert not srv.authenticated and not srv.done


@pytest.mark.parametrize("auth", [b"\x00", p.encode_auth(bytes(32))], ids=["none", "zeros"])
def test_an_id_without_a_valid_proof_is_refused(auth):
    srv = server()
    srv.on_hello(device().hello())
    fails(p.REJECT_BAD_PROOF, srv.on_auth, auth)


def test_the_servers_proof_cannot_be_reflected_as_the_devices():
    dev, srv = device(), server()
    challenge = srv.on_hello(dev.hello())
    proof_s = p.decode_challenge(challenge)[2]
    fails(p.REJECT_BAD_PROOF, srv.on_auth, p.encode_auth(proof_s))


def test_a_recorded_hello_and_auth_replayed_to_a_new_server_are_refused():
    dev, srv = device(), server()
    hello = dev.hello()
    auth = dev.on_challenge(srv.on_hello(hello))
    srv.on_auth(auth)                           # the original exchange succeeds
    replayed = server()                         # fresh nonce_s
    replayed.on_hello(hello)
    assert fails(p.REJECT_BAD_PROOF, replayed.on_auth, auth) == "bad proof for id gw-17"


def test_a_recorded_challenge_replayed_to_a_new_device_is_refused():
    dev, srv = device(), server()
    challenge = srv.on_hello(dev.hello())
    dev.on_challenge(challenge)
    fresh = device()                            # fresh nonce_d
    fresh.hello()
    assert fails(p.REJECT_BAD_PROOF, fresh.on_challenge, challenge) == \
        "the server failed to prove the secret for id gw-17 (wrong proof)"


def test_the_same_nonces_give_the_same_bytes_and_fresh_ones_differ():
    fixed = [bytes(32), bytes(range(32))]
    runs = []
    for nonces in (fixed, fixed, [None, None]):
        dev, srv = device(nonce=nonces[0]), server(nonce=nonces[1])
        hello = dev.hello()
        challenge = srv.on_hello(hello)
        runs.append((hello, challenge, dev.on_challenge(challenge)))
    assert runs[0] == runs[1] and runs[2][0] != runs[0][0] and runs[2][1] != runs[0][1]


def test_a_server_without_proof_for_an_identified_device_is_refused():
    dev = device()
    dev.hello()
    bare = p.encode_challenge(bytes(32), 65536)
    assert fails(p.REJECT_BAD_PROOF, dev.on_challenge, bare) == \
        "the server failed to prove the secret for id gw-17 (no proof in its CHALLENGE)"


def test_a_proof_sent_to_a_device_without_id_is_malformed():
    # The server sends proof_s only to a HELLO that named an id.
    dev = device("", None)
    hello = dev.hello()
    body = p.challenge_body(bytes(32), 65536)
    challenge = p.encode_challenge(bytes(32), 65536, server_proof(SECRET, hello, body))
    assert fails(p.REJECT_MALFORMED, dev.on_challenge, challenge) == \
        "CHALLENGE carries a proof for a HELLO without id"


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


def test_an_oversized_auth_or_challenge_is_malformed():
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
    fails(p.REJECT_MALFORMED, dev.on_welcome, b"\x00\x03a:1\x00")
    assert dev.host is None


def test_handshake_errors_are_the_peers_fault():
    assert issubclass(HandshakeError, PeerError)


def test_nothing_secret_in_any_message_or_repr():
    said = []
    dev, srv = device(secret=OTHER), server()
    said += [repr(dev), repr(srv)]
    challenge = srv.on_hello(dev.hello())
    said += [repr(dev), repr(srv)]
    for call, arg in ((dev.on_challenge, challenge), (srv.on_auth, b"\x20" + bytes(32)),
                      (server().on_hello, device("gw-99").hello())):
        try:
            call(arg)
        except HandshakeError as exc:
            said += [str(exc), repr(exc)]
    said += [repr(dev), repr(srv)]
    assert len(said) == 12
    for secret in (SECRET, OTHER):
        for form in (secret.decode(), secret.hex(), repr(secret)):
            assert not any(form in line for line in said), form


def test_check_secret_asks_for_128_bits():
    for weak in ("", "a" * 21, "0123456789abcdef" + "0" * 15, "f" * 31):
        problem = check_secret(weak)
        assert problem and "at least 22, or 32 when it is hex digits only" in problem
        assert weak == "" or weak not in problem
    for strong in ("z" * 22, "0123456789abcdef" * 2, "0123456789ABCDEF" * 2):
        assert check_secret(strong) is None, strong
    assert check_secret("0" * 31 + "g") is None           # 32 characters, not all hex: >= 22
    assert check_secret("0" * 31) is not None              # hex only: 31 < 32


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
