"""wire.mac: HMAC-SHA256 over the interpreter's builtin SHA-256, and the
constant-time compare, without OpenSSL (hmac and hashlib load libcrypto)."""

import hmac
import os
import random
import subprocess
import sys

import pytest

from support import ROOT
from tcprc.wire.mac import compare_digest, hmac_sha256

# RFC 4231, section 4: every HMAC-SHA-256 test case (key, data, MAC in hex).
# Case 5's MAC is truncated to 128 bits; cases 6 and 7 have 131-byte keys,
# longer than SHA-256's 64-byte block, so the key is hashed first.
RFC4231 = [
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\x0c" * 20, b"Test With Truncation",
     "a3b6167473100ee06e0c796c2955552b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than "
     b"block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]


@pytest.mark.parametrize("key, data, expected", RFC4231, ids=["case%d" % n for n in range(1, 8)])
def test_rfc4231_known_answers(key, data, expected):
    mac = hmac_sha256(key, data)
    assert len(mac) == 32
    assert mac.hex()[:len(expected)] == expected


def test_the_same_as_the_stdlib_hmac_on_random_keys_and_messages():
    rng = random.Random(4231)
    # Key lengths around the block size (64) and the digest size (32) matter most.
    lengths = [0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200] + [rng.randrange(300) for _ in range(40)]
    for key_len in lengths:
        key = bytes(rng.randrange(256) for _ in range(key_len))
        msg = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 55, 56, 64, 1000, 5000])))
        assert hmac_sha256(key, msg) == hmac.new(key, msg, "sha256").digest(), (key_len, len(msg))


def test_parts_are_hashed_as_their_concatenation():
    key, parts = os.urandom(32), [b"tcprc v2 device\0", os.urandom(40), b"", memoryview(os.urandom(37))]
    assert hmac_sha256(key, *parts) == hmac.new(key, b"".join(parts), "sha256").digest()


def test_compare_digest_is_equality_of_bytes():
    a = os.urandom(32)
    assert compare_digest(a, bytes(a)) and compare_digest(b"", b"")
    for i in range(32):   # a difference anywhere, and a different length
        assert not compare_digest(a, a[:i] + bytes([a[i] ^ 1]) + a[i + 1:])
    assert not compare_digest(a, a[:31]) and not compare_digest(a, a + b"\0")
    assert compare_digest(memoryview(a), bytearray(a))


def test_the_handshake_path_imports_neither_hmac_nor_hashlib():
    """A whole v2 handshake with an id, both sides, in a fresh interpreter."""
    code = ("import sys\n"
            "from tcprc.wire.handshake import DeviceHandshake\n"
            "from tcprc.wire.server_handshake import ServerHandshake\n"
            "from tcprc.settings import Secret\n"
            "key = b'k' * 24\n"
            "dev, srv = DeviceHandshake('gw', key, 65536), ServerHandshake({'gw': key}.get, 65536, False)\n"
            "srv.on_auth(dev.on_challenge(srv.on_hello(dev.hello())))\n"
            "assert dev.on_welcome(srv.welcome('0.0.0.0:1')) == '0.0.0.0:1' and srv.authenticated\n"
            "assert Secret(key) == Secret(key) and Secret(key) != Secret(b'x')\n"
            "print(sorted({'hmac', 'hashlib', '_hashlib'} & set(sys.modules)))\n"
            "print(any('libcrypto' in line for line in open('/proc/self/maps')))\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"], out.stdout
