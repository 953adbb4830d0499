"""Protocol v2 frame codecs (tcprc.wire.frames): the byte examples of
docs/protocol.md, every malformed payload, and the CLOSE reason of an error."""

import errno
import os
import re
import socket
import struct
import subprocess
import sys

import pytest

from support import ROOT
from tcprc.wire import frames as p
from tcprc.wire import handshake as h
from tcprc.wire.server_handshake import ServerHandshake
from tcprc.wire.frames import ProtocolError, VersionError

# The handshake of the doc's example: fixed nonces instead of os.urandom(32).
NONCE_D = bytes(range(0x00, 0x20))
NONCE_S = bytes(range(0x20, 0x40))
SECRET = b"example-secret-do-not-use"
DEVICE_WINDOW = 262144
SERVER_WINDOW = 1048576


def example_exchange(device_id="gw-17", secret=SECRET):
    """(HELLO, CHALLENGE, AUTH, WELCOME payloads) of the doc's example handshake."""
    device = h.DeviceHandshake(device_id, secret, DEVICE_WINDOW, nonce=NONCE_D)
    server = ServerHandshake(lambda name: secret if name == device_id else None,
                               SERVER_WINDOW, True, nonce=NONCE_S)
    hello = device.hello()
    challenge = server.on_hello(hello)
    auth = device.on_challenge(challenge)
    server.on_auth(auth)
    welcome = server.welcome("127.0.0.1:2222")
    assert device.on_welcome(welcome) == "127.0.0.1:2222"
    return hello, challenge, auth, welcome


def refusal(device_id, secret):
    """The REJECT payload a server sends for this device's AUTH (it knows gw-17 only)."""
    device = h.DeviceHandshake(device_id, secret, DEVICE_WINDOW, nonce=NONCE_D)
    server = ServerHandshake({"gw-17": SECRET}.get, SERVER_WINDOW, True, nonce=NONCE_S)
    with pytest.raises(h.HandshakeError) as caught:
        server.on_auth(device.on_challenge(server.on_hello(device.hello())))
    return p.encode_reject(caught.value.code, caught.value.wire_text)


HELLO, CHALLENGE_, AUTH, WELCOME = example_exchange()
A_HELLO, A_CHALLENGE, A_AUTH, A_WELCOME = example_exchange("", None)
REJECT_UNKNOWN = refusal("gw-99", SECRET)
REJECT_WRONG = refusal("gw-17", b"not-the-secret-of-gw-17")

# (name, frame built by the code, the bytes docs/protocol.md shows)
EXAMPLES = [
    ("OFFER", p.OFFER_FRAME, "00 00 05 02"),
    ("HELLO, id gw-17", p.encode(p.HELLO, 0, HELLO),
     "00 2c 06 00 02 00 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16"
     " 17 18 19 1a 1b 1c 1d 1e 1f 00 04 00 00 05 67 77 2d 31 37"),
    ("CHALLENGE", p.encode(p.CHALLENGE, 0, CHALLENGE_),
     "00 25 07 00 02 20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31 32 33 34 35 36 37"
     " 38 39 3a 3b 3c 3d 3e 3f 00 10 00 00"),
    ("AUTH with proof_d", p.encode(p.AUTH, 0, AUTH),
     "00 21 08 00 20 2d 91 52 46 0c ad b7 d3 43 fd 6c 8e 84 85 6e a3 23 f1 f2 19 59 85 56 d8"
     " ff 7b 27 1b 6f 5c 96 48"),
    ("WELCOME with proof_s", p.encode(p.WELCOME, 0, WELCOME),
     "00 31 09 00 20 d5 c7 0d 6d 62 0f 6c 7c 89 48 50 fe 16 a3 d5 7c c1 18 47 1f b8 cc 4b 16"
     " e5 8b b2 80 a9 0c e1 67 00 0e 31 32 37 2e 30 2e 30 2e 31 3a 32 32 32 32"),
    ("HELLO without id", p.encode(p.HELLO, 0, A_HELLO),
     "00 27 06 00 02 00 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16"
     " 17 18 19 1a 1b 1c 1d 1e 1f 00 04 00 00 00"),
    ("AUTH without proof", p.encode(p.AUTH, 0, A_AUTH), "00 01 08 00 00"),
    ("WELCOME without proof", p.encode(p.WELCOME, 0, A_WELCOME),
     "00 11 09 00 00 00 0e 31 32 37 2e 30 2e 30 2e 31 3a 32 32 32 32"),
    ("REJECT 2, unknown id", p.encode(p.REJECT, 0, REJECT_UNKNOWN),
     "00 16 0a 00 02 61 75 74 68 65 6e 74 69 63 61 74 69 6f 6e 20 66 61 69 6c 65 64"),
    ("REJECT 2, wrong secret", p.encode(p.REJECT, 0, REJECT_WRONG),
     "00 16 0a 00 02 61 75 74 68 65 6e 74 69 63 61 74 69 6f 6e 20 66 61 69 6c 65 64"),
    ("CREDIT", p.credit_frame(7, 65536), "00 04 0b 07 00 01 00 00"),
    ("EOF", p.encode(p.EOF, 7), "00 00 0c 07"),
    ("PING", p.encode(p.PING, 0, p.encode_ping(0x0123456789abcdef)),
     "00 08 0d 00 01 23 45 67 89 ab cd ef"),
    ("PONG", p.encode(p.PONG, 0, p.decode_ping(bytes.fromhex("0123456789abcdef"))),
     "00 08 0e 00 01 23 45 67 89 ab cd ef"),
    ("CLOSE, done", p.encode(p.CLOSE, 7, p.encode_close_reason(p.CLOSE_DONE)), "00 00 02 07"),
    ("CLOSE, refused", p.encode(p.CLOSE, 7, p.encode_close_reason(p.CLOSE_REFUSED,
                                                                  "connection refused")),
     "00 13 02 07 02 63 6f 6e 6e 65 63 74 69 6f 6e 20 72 65 66 75 73 65 64"),
]


def _doc_text():
    with open(os.path.join(ROOT, "docs", "protocol.md")) as handle:
        return " ".join(handle.read().split())


@pytest.mark.parametrize("name,built,shown", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_the_byte_examples_of_the_doc_are_what_the_code_builds(name, built, shown):
    assert built.hex(" ") == shown
    # The doc shows the same bytes (line breaks in a long example count as spaces).
    assert shown in _doc_text(), "docs/protocol.md lacks the %s example" % name


def test_the_doc_examples_decode_back_to_their_fields():
    assert p.decode_hello(HELLO) == (NONCE_D, DEVICE_WINDOW, "gw-17")
    assert p.decode_challenge(CHALLENGE_) == (NONCE_S, SERVER_WINDOW)
    assert A_CHALLENGE == CHALLENGE_            # the same for any HELLO: nothing of the id in it
    proof, host = p.decode_welcome(WELCOME)
    assert len(proof) == 32 and host == "127.0.0.1:2222"
    assert p.decode_hello(A_HELLO) == (NONCE_D, DEVICE_WINDOW, "")
    assert p.decode_auth(A_AUTH) == b""
    assert p.decode_welcome(A_WELCOME) == (b"", "127.0.0.1:2222")
    assert p.decode_welcome(p.encode_welcome("[::1]:22")) == (b"", "[::1]:22")
    assert p.decode_reject(REJECT_UNKNOWN) == (p.REJECT_BAD_PROOF, "authentication failed")
    assert p.decode_reject(p.encode_reject(5, "host port busy")) == (5, "host port busy")
    assert p.decode_credit(struct.pack("!I", 1)) == 1
    assert p.decode_credit(struct.pack("!I", 1 << 31)) == 1 << 31
    assert p.decode_pong(p.encode_ping(-1)) == 2 ** 64 - 1      # wraps, never fails
    assert p.decode_close_reason(b"") == (0, "")
    assert p.decode_close_reason(b"\x04") == (4, "")
    assert p.decode_close_reason(memoryview(b"\x05not allowed")) == (5, "not allowed")
    assert p.decode_close_reason(b"\x63") == (99, "")   # unknown reasons pass through
    assert p.close_reason_name(99) == "reason 99" and p.reject_name(3) == "identity required"
    assert p.COMMAND_NAMES[p.CREDIT] == "CREDIT" and p.V2 == 2


def test_the_macs_are_the_spec_formula_over_the_example_bytes():
    import hashlib
    import hmac
    proof_d = hmac.new(SECRET, b"tcprc v2 device\x00" + HELLO + CHALLENGE_, hashlib.sha256).digest()
    proof_s = hmac.new(SECRET, b"tcprc v2 server\x00" + HELLO + CHALLENGE_ + AUTH,
                       hashlib.sha256).digest()
    assert AUTH == b"\x20" + proof_d
    assert WELCOME == b"\x20" + proof_s + b"\x00\x0e127.0.0.1:2222"


def _hello(version=2, flags=0, window=DEVICE_WINDOW, raw_id=b"gw-17", id_len=None):
    id_len = len(raw_id) if id_len is None else id_len
    return struct.pack("!BB32sIB", version, flags, NONCE_D, window, id_len) + raw_id


def _challenge(version=2, window=SERVER_WINDOW):
    return struct.pack("!B32sI", version, NONCE_S, window)


MALFORMED = [
    # HELLO
    (p.decode_hello, b"", "HELLO payload is empty"),
    (p.decode_hello, _hello()[:20], "HELLO payload of 20 bytes is too short"),
    (p.decode_hello, _hello()[:-1], "does not match id length 5"),
    (p.decode_hello, _hello() + b"x", "HELLO payload of 45 bytes does not match id length 5"),
    (p.decode_hello, _hello(flags=1), "HELLO flags 0x01: none are defined"),
    (p.decode_hello, _hello(window=0), "HELLO window 0 is outside 1..2147483648"),
    (p.decode_hello, _hello(window=(1 << 31) + 1), "is outside 1..2147483648"),
    (p.decode_hello, _hello(raw_id=b"a" * 65), "HELLO id of 65 bytes exceeds 64"),
    (p.decode_hello, _hello(raw_id=b"gw 17"), "characters outside [A-Za-z0-9._-]"),
    (p.decode_hello, _hello(raw_id=b"gw/17"), "characters outside [A-Za-z0-9._-]"),
    (p.decode_hello, _hello(raw_id=b"gw\x0017"), "characters outside [A-Za-z0-9._-]"),
    (p.decode_hello, _hello(raw_id=b"gw\xe917"), "characters outside [A-Za-z0-9._-]"),
    # CHALLENGE
    (p.decode_challenge, b"", "CHALLENGE payload is empty"),
    (p.decode_challenge, _challenge()[:36], "CHALLENGE payload of 36 bytes is not 37"),
    (p.decode_challenge, _challenge() + b"x", "CHALLENGE payload of 38 bytes is not 37"),
    (p.decode_challenge, _challenge() + b"\x20" + b"x" * 32,   # the old proof_s field
     "CHALLENGE payload of 70 bytes is not 37"),
    (p.decode_challenge, _challenge(window=0), "CHALLENGE window 0 is outside"),
    # AUTH
    (p.decode_auth, b"", "AUTH payload of 0 bytes has no proof length"),
    (p.decode_auth, b"\x1f" + b"x" * 31, "AUTH proof length 31 is neither 0 nor 32"),
    (p.decode_auth, b"\x20" + b"x" * 31, "AUTH payload of 32 bytes does not match proof length 32"),
    (p.decode_auth, b"\x20" + b"x" * 33, "AUTH payload of 34 bytes does not match proof length 32"),
    (p.decode_auth, b"\x00\x00", "AUTH payload of 2 bytes does not match proof length 0"),
    # WELCOME
    (p.decode_welcome, b"", "WELCOME payload of 0 bytes has no proof length"),
    (p.decode_welcome, b"\x00\x00", "WELCOME payload of 2 bytes is too short"),
    (p.decode_welcome, b"\x10" + b"x" * 16 + b"\x00\x03a:1", "proof length 16 is neither 0 nor 32"),
    (p.decode_welcome, b"\x20" + b"x" * 32 + b"\x00", "WELCOME payload of 34 bytes is too short"),
    (p.decode_welcome, b"\x20" + b"x" * 31 + b"\x00\x03a:1", "does not match text length"),
    (p.decode_welcome, b"\x00\x00\x05abc", "does not match text length 5"),
    (p.decode_welcome, b"\x00\x00\x00", "WELCOME text of 0 bytes is outside 1..255"),
    (p.decode_welcome, b"\x00\x01\x00" + b"a" * 256, "WELCOME text of 256 bytes is outside 1..255"),
    (p.decode_welcome, b"\x00\x00\x03\xe9:1", "WELCOME text is not ASCII"),
    (p.decode_welcome, b"\x00\x00\x04a :1", "spaces or control characters"),
    (p.decode_welcome, b"\x00\x00\x04a\n:1", "spaces or control characters"),
    (p.decode_welcome, b"\x00\x0e127.0.0.1:2222", "does not match text length 3633"),  # old form
    # REJECT
    (p.decode_reject, b"", "REJECT payload is empty"),
    (p.decode_reject, b"\x00why", "REJECT code 0 is not a code"),
    (p.decode_reject, b"\x01" + b"x" * 201, "REJECT text of 201 bytes exceeds 200"),
    (p.decode_reject, b"\x01\xff\xfe", "REJECT text is not UTF-8"),
    (p.decode_reject, b"\x01two\nlines", "REJECT text contains control characters"),
    # CREDIT
    (p.decode_credit, b"\x00\x00\x01", "CREDIT payload of 3 bytes is not 4"),
    (p.decode_credit, b"\x00\x00\x00\x01\x00", "CREDIT payload of 5 bytes is not 4"),
    (p.decode_credit, b"\x00\x00\x00\x00", "CREDIT of 0 is outside 1..2147483648"),
    (p.decode_credit, b"\x80\x00\x00\x01", "CREDIT of 2147483649 is outside 1..2147483648"),
    (p.decode_credit, b"\xff\xff\xff\xff", "CREDIT of 4294967295 is outside"),
    # PING, PONG
    (p.decode_ping, b"x" * 7, "PING payload of 7 bytes is not 8"),
    (p.decode_ping, b"x" * 9, "PING payload of 9 bytes is not 8"),
    (p.decode_pong, b"", "PONG payload of 0 bytes is not 8"),
    # CLOSE
    (p.decode_close_reason, b"\x06" + "é".encode() * 101, "CLOSE text of 202 bytes exceeds 200"),
    (p.decode_close_reason, b"\x06\xc3", "CLOSE text is not UTF-8"),
    (p.decode_close_reason, b"\x06a\x1b[2Jb", "CLOSE text contains control characters"),
    # OFFER, EOF
    (lambda b: p.check_empty(p.EOF, b), b"x", "EOF payload of 1 bytes should be empty"),
    (lambda b: p.check_empty(p.OFFER, b), b"\x02", "OFFER payload of 1 bytes should be empty"),
]


@pytest.mark.parametrize("decode,payload,reason", MALFORMED,
                         ids=["%d-%s" % (n, m[2][:30]) for n, m in enumerate(MALFORMED)])
def test_a_malformed_payload_raises_a_one_line_protocol_error(decode, payload, reason):
    for given in (payload, memoryview(payload)):
        with pytest.raises(ProtocolError) as caught:
            decode(given)
        assert reason in str(caught.value) and "\n" not in str(caught.value)
        assert not isinstance(caught.value, VersionError)


@pytest.mark.parametrize("decode,payload", [
    (p.decode_hello, HELLO), (p.decode_challenge, CHALLENGE_), (p.decode_auth, AUTH),
    (p.decode_welcome, WELCOME), (p.decode_hello, A_HELLO), (p.decode_auth, A_AUTH),
    (p.decode_welcome, A_WELCOME)],
    ids=["hello", "challenge", "auth", "welcome", "anonymous hello", "anonymous auth",
         "anonymous welcome"])
def test_every_truncation_and_extension_of_a_handshake_payload_is_refused(decode, payload):
    decode(payload)
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode(payload[:cut])
    for extra in (b"\x00", b"\x00" * 100):
        with pytest.raises(ProtocolError):
            decode(payload + extra)


@pytest.mark.parametrize("decode,payload", [(p.decode_hello, _hello(version=3)),
                                            (p.decode_hello, b"\x01"),
                                            (p.decode_challenge, _challenge(version=1) + b"x" * 9)])
def test_another_version_is_a_version_error_whatever_follows(decode, payload):
    with pytest.raises(VersionError) as caught:
        decode(payload)
    assert caught.value.version == payload[0]
    assert "of protocol version %d (this side speaks 2)" % payload[0] in str(caught.value)


def test_texts_sent_are_clipped_to_one_printable_line_of_200_bytes():
    assert p.encode_close_reason(p.CLOSE_DONE, "") == b""
    assert p.encode_close_reason(p.CLOSE_DONE, "bye") == b"\x00bye"
    long = p.encode_close_reason(p.CLOSE_ERROR, "é" * 150)     # 300 bytes of UTF-8
    assert long == b"\x06" + "é".encode() * 100
    assert p.decode_close_reason(long) == (6, "é" * 100)
    odd = p.encode_reject(p.REJECT_SERVER_ERROR, "a\nb\x00c" + "x" * 300)
    assert odd[:6] == b"\x07a?b?c" and len(odd) == 201
    assert p.decode_reject(odd)[0] == 7


@pytest.mark.parametrize("call", [
    lambda: p.credit_frame(1, 0), lambda: p.credit_frame(1, (1 << 31) + 1),
    lambda: p.encode_hello(b"short", 1), lambda: p.encode_hello(NONCE_D, 0),
    lambda: p.encode_hello(NONCE_D, 1, "bad id"), lambda: p.encode_challenge(NONCE_S, 0),
    lambda: p.encode_auth(b"x" * 31), lambda: p.encode_welcome(""),
    lambda: p.encode_welcome("a:1", b"x" * 31),
    lambda: p.encode_reject(0), lambda: p.encode_close_reason(256)])
def test_our_own_bad_fields_are_a_value_error_not_a_frame(call):
    with pytest.raises(ValueError):
        call()


def test_valid_id_is_the_hello_charset():
    assert p.valid_id("") and p.valid_id("gw_17.A-b") and p.valid_id("a" * 64)
    for bad in ("a" * 65, "gw 17", "gw/17", "gw:17", "gwé", "gw\n"):
        assert not p.valid_id(bad), bad


# close_reason_for, over errors real sockets raise.

def _refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]       # bound, not listening: the kernel refuses
        with socket.socket() as sock:
            try:
                sock.connect(("127.0.0.1", port))
            except OSError as exc:
                return exc
    raise AssertionError("connect to a closed port succeeded")


def _timed_out():
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(0.01)
        try:
            left.recv(1)
        except OSError as exc:
            return exc
    raise AssertionError("recv returned")


def _reset():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=5) as sock:
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()                        # RST
            try:
                sock.recv(1)
            except OSError as exc:
                return exc
    raise AssertionError("recv after RST returned")


def _name_not_found():
    try:
        socket.getaddrinfo("no-such-host", 80, flags=socket.AI_NUMERICHOST)
    except OSError as exc:
        return exc
    raise AssertionError("a name resolved as a number")


def _address_in_use():
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        first.listen(1)
        try:
            second.bind(first.getsockname())
        except OSError as exc:
            return exc
    raise AssertionError("bound twice")


@pytest.mark.parametrize("make,reason", [
    (_refused, p.CLOSE_REFUSED), (_timed_out, p.CLOSE_TIMEOUT), (_reset, p.CLOSE_RESET),
    (_name_not_found, p.CLOSE_UNREACHABLE), (_address_in_use, p.CLOSE_ERROR),
    (lambda: OSError(errno.EHOSTUNREACH, "No route to host"), p.CLOSE_UNREACHABLE),
    (lambda: OSError(errno.ENETUNREACH, "Network is unreachable"), p.CLOSE_UNREACHABLE),
    (lambda: OSError(errno.ETIMEDOUT, "Connection timed out"), p.CLOSE_TIMEOUT),
], ids=["refused", "timeout", "reset", "gaierror", "in use", "host unreachable",
        "net unreachable", "etimedout"])
def test_close_reason_for_an_error(make, reason):
    exc = make()
    assert p.close_reason_for(exc, False) == reason
    assert p.close_reason_for(exc, True) == p.CLOSE_NOT_ALLOWED
    assert p.close_reason_name(reason) == {2: "refused", 3: "unreachable", 4: "timed out",
                                           1: "reset", 6: "error"}[reason]


def test_the_frame_codec_does_not_import_hmac_or_hashlib():
    # Only a v2 uplink imports wire.handshake; a legacy agent loads no hash module.
    code = ("import sys, tcprc.wire.frames\n"
            "print(sorted({'hashlib', 'hmac', '_hashlib', 'tcprc.wire.handshake'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    imported = re.findall(r"\|\s+([\w.]+)\s*$", out.stderr, re.M)
    assert "tcprc.wire.frames" in imported and not {"hashlib", "hmac"} & set(imported)
