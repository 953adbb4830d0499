"""HMAC-SHA256 (RFC 2104) and a constant-time compare, without OpenSSL.

The stdlib's hmac imports hashlib, which loads _hashlib and with it OpenSSL's
libcrypto: 3.7 MB of RSS on a device that computes one HMAC per session.
SHA-256 itself is built into the interpreter (the `_sha256` module up to
Python 3.11, `_sha2` from 3.12), so the two hashes of RFC 2104 cost nothing
more.  Only an interpreter built without that module (none of the CPythons we
run on) falls back to hashlib's SHA-256, and so to OpenSSL.

The compare is the interpreter's own constant-time one, `_operator._compare_digest`
(what hmac.compare_digest falls back to without OpenSSL): it reads every byte
of both operands, whatever the first difference, so its time tells only the
length, and a proof's length is public (32 bytes).
"""

from _operator import _compare_digest as compare_digest
from typing import Any

__all__ = ["BLOCK_SIZE", "DIGEST_SIZE", "compare_digest", "hmac_sha256"]

BLOCK_SIZE = 64
DIGEST_SIZE = 32
_IPAD = bytes(x ^ 0x36 for x in range(256))   # key XOR ipad, byte by byte, as a translate table
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _sha256() -> Any:
    # At the first HMAC, not at import: the module is an extension of its own
    # (28 KB of RSS) and a device without an id computes none (docs/benchmarks.md,
    # third round).
    try:
        from _sha2 import sha256                 # 3.12 and newer
    except ImportError:
        try:
            from _sha256 import sha256           # 3.8 .. 3.11
        except ImportError:                      # pragma: no cover (no builtin SHA-256)
            from hashlib import sha256
    return sha256


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256(key, the concatenation of `parts`): 32 bytes."""
    sha256 = _sha256()
    if len(key) > BLOCK_SIZE:
        key = sha256(key).digest()
    key = bytes(key).ljust(BLOCK_SIZE, b"\0")
    inner = sha256(key.translate(_IPAD))
    for part in parts:
        inner.update(part)
    outer = sha256(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()
