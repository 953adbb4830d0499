"""The peer handshake codec in memory: both sides prove the cluster secret, what is
asked is under the proof, and every wrong line is one clear error."""

import pytest

from tcprc.cluster.peerwire import (AUTH_FAILED, MAX_LINE, DialerHandshake, LineReader,
                                    ListenerHandshake, PeerHandshakeError)

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"


def pair(dialer_secret=SECRET, listener_secret=SECRET, service="", expect="s1", cluster="prod"):
    dialer = DialerHandshake(dialer_secret, cluster, "s2", "gw1", service, expect_node=expect)
    listener = ListenerHandshake(listener_secret, "prod", "s1")
    return dialer, listener


def run_to_verdict(dialer, listener):
    challenge = listener.on_hello(dialer.hello())
    listener.on_auth(dialer.on_challenge(challenge))
    return listener


def test_accepted_both_ways_and_the_request_is_what_was_asked():
    dialer, listener = pair(service="web")
    run_to_verdict(dialer, listener)
    assert (listener.device_id, listener.service, listener.peer_node) == ("gw1", "web", "s2")
    assert listener.authenticated
    assert dialer.on_verdict(listener.accept()) is True
    assert dialer.peer_node == "s1"


def test_a_refusal_carries_its_reason_under_the_proof():
    dialer, listener = pair()
    run_to_verdict(dialer, listener)
    line = listener.refuse("device gw1 is not here\n(moved)")
    assert line.count(b"\n") == 1
    assert dialer.on_verdict(line) is False
    assert dialer.reason == "device gw1 is not here (moved)"


def test_a_changed_reason_or_a_refusal_turned_into_accept_fails_the_proof():
    dialer, listener = pair()
    run_to_verdict(dialer, listener)
    line = listener.refuse("not here")
    with pytest.raises(PeerHandshakeError, match="failed to prove the cluster secret"):
        dialer.on_verdict(line.replace(b"not here", b"go away"))
    dialer, listener = pair()
    run_to_verdict(dialer, listener)
    proof = listener.refuse("not here").split(b" ")[1]
    with pytest.raises(PeerHandshakeError, match="failed to prove"):
        dialer.on_verdict(b"ACCEPT " + proof + b"\n")


def test_a_dialer_with_the_wrong_secret_is_refused_without_a_hint():
    dialer, listener = pair(dialer_secret=OTHER)
    challenge = listener.on_hello(dialer.hello())
    with pytest.raises(PeerHandshakeError) as info:
        listener.on_auth(dialer.on_challenge(challenge))
    assert info.value.wire_text == AUTH_FAILED and "bad proof" in str(info.value)
    assert not listener.authenticated
    with pytest.raises(ValueError):
        listener.accept()        # no verdict, no MAC for an unproven peer


def test_a_listener_with_the_wrong_secret_cannot_accept():
    dialer, listener = pair(listener_secret=OTHER)
    challenge = listener.on_hello(dialer.hello())
    auth = dialer.on_challenge(challenge)
    # It cannot check the proof either; even if it answered, the dialer sees through it.
    with pytest.raises(PeerHandshakeError):
        listener.on_auth(auth)
    fake = ListenerHandshake(OTHER, "prod", "s1")
    fake.on_hello(dialer._hello)
    fake._challenge, fake._auth, fake._state = challenge, auth, "verdict"
    with pytest.raises(PeerHandshakeError, match="failed to prove the cluster secret"):
        dialer.on_verdict(fake.accept())


def test_the_device_asked_is_under_the_proof():
    dialer, listener = pair()
    challenge = listener.on_hello(dialer.hello())
    auth = dialer.on_challenge(challenge)
    with pytest.raises(PeerHandshakeError, match="bad proof"):
        listener.on_auth(auth.replace(b"device=gw1", b"device=gw2"))


def test_a_replayed_auth_fails_on_a_new_challenge():
    dialer, listener = pair()
    hello = dialer.hello()
    auth = dialer.on_challenge(listener.on_hello(hello))
    again = ListenerHandshake(SECRET, "prod", "s1")
    again.on_hello(hello)                 # a fresh nonce of its own
    with pytest.raises(PeerHandshakeError, match="bad proof"):
        again.on_auth(auth)


def test_proofs_do_not_reflect():
    # A dialer's proof over the same transcript is not a listener's verdict proof.
    dialer, listener = pair()
    run_to_verdict(dialer, listener)
    auth_proof = dialer._auth.rstrip(b"\n").rpartition(b"proof=")[2]
    with pytest.raises(PeerHandshakeError, match="failed to prove"):
        dialer.on_verdict(b"ACCEPT proof=" + auth_proof + b"\n")


def test_the_wrong_node_or_cluster_is_named():
    dialer, listener = pair(expect="s3")
    with pytest.raises(PeerHandshakeError, match="dialed node s3, but node s1 answered"):
        dialer.on_challenge(listener.on_hello(dialer.hello()))
    dialer, listener = pair(cluster="test")
    with pytest.raises(PeerHandshakeError, match="node s2 is of cluster test, not prod") as info:
        listener.on_hello(dialer.hello())
    assert info.value.wire_text == "this is cluster prod"


@pytest.mark.parametrize("line, expected", [
    (b"GET / HTTP/1.1\r\n", "not a tcprc peer"),
    (b"TCPRC-PEER/1 HELLO cluster=prod node=s2\n", "malformed HELLO"),
    (b"TCPRC-PEER/1 HELLO cluster=prod node=s2 nonce=zz\n", "malformed HELLO nonce"),
    (b"TCPRC-PEER/1 HELLO cluster=prod node=s 2 nonce=" + b"00" * 32 + b"\n", "malformed"),
    (b"TCPRC-PEER/1 HELLO cluster=prod node=s\xff nonce=" + b"00" * 32 + b"\n", "not ASCII"),
    (b"TCPRC-PEER/1 CHALLENGE node=s2 nonce=" + b"00" * 32 + b"\n", "expected HELLO"),
])
def test_bad_hello_lines(line, expected):
    listener = ListenerHandshake(SECRET, "prod", "s1")
    with pytest.raises(PeerHandshakeError, match=expected):
        listener.on_hello(line)
    with pytest.raises(PeerHandshakeError, match="out of order"):
        listener.on_auth(b"AUTH device=gw1 service= proof=00\n")


def test_an_error_line_from_the_listener_is_reported():
    dialer, _ = pair()
    dialer.hello()
    with pytest.raises(PeerHandshakeError, match="refused: this is cluster prod"):
        dialer.on_challenge(b"ERROR this is cluster prod\n")


def test_lines_are_bounded_and_the_rest_is_kept_for_the_raw_stream():
    reader = LineReader()
    reader.feed(b"ACCEPT proof=ab\nraw bytes\nafter it")
    assert reader.next_line() == b"ACCEPT proof=ab\n"
    assert reader.rest == b"raw bytes\nafter it"   # untouched: the client's bytes
    long = LineReader()
    long.feed(b"x" * (MAX_LINE + 1))
    with pytest.raises(PeerHandshakeError, match="over %d bytes" % MAX_LINE):
        long.next_line()
    partial = LineReader()
    partial.feed(b"x" * MAX_LINE)
    assert partial.next_line() is None


def test_nothing_secret_in_reprs_or_lines():
    dialer, listener = pair()
    run_to_verdict(dialer, listener)
    seen = repr(dialer) + repr(listener) + dialer._hello.decode() + dialer._auth.decode()
    assert SECRET.decode() not in seen and SECRET.hex() not in seen
