"""The protocol v2 handshake as two state machines without I/O (docs/protocol.md,
"Protocol version 2"): bytes of HELLO, CHALLENGE, AUTH, WELCOME in, payloads to
send out, HandshakeError (with the REJECT code and text to send) on anything wrong.

The device proves first (AUTH), the server after it (in WELCOME): a server
that answered a HELLO with a proof would hand anyone who names an id a MAC
under that id's secret, to guess it offline.  The server also answers a
known id and an unknown one alike until AUTH, and refuses both alike, so
that nobody can list its ids.

Only a v2 uplink imports this module.  The proofs are HMAC-SHA256 over the
interpreter's builtin SHA-256 (wire.mac), not the stdlib's hmac: that one
loads OpenSSL's libcrypto, 3.7 MB of RSS on a device that computes two MACs
per session.  Nothing secret appears in a message, an error or a repr.
"""

import os
from typing import Any, Optional

from ..errors import PeerError
from . import frames
from .frames import ProtocolError, VersionError
from .mac import compare_digest, hmac_sha256

SERVER_LABEL = b"tcprc v2 server\0"
DEVICE_LABEL = b"tcprc v2 device\0"
AUTH_FAILED = "authentication failed"   # the server's REJECT 2 text, whatever the cause
_EXPECTING = {"start": "nothing before HELLO", "hello": "HELLO", "challenge": "CHALLENGE",
              "auth": "AUTH", "welcome": "WELCOME", "done": "nothing more",
              "failed": "nothing: the handshake failed"}


class HandshakeError(PeerError):
    """The handshake failed: `code` and `wire_text` go in the REJECT to send;
    str() is the one line for this side's log, which may say more."""

    def __init__(self, code: int, message: str, wire_text: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.wire_text = message if wire_text is None else wire_text


def valid_device_id(text: str) -> bool:
    """1..64 characters of [A-Za-z0-9._-] ("" is no id)."""
    return bool(text) and frames.valid_id(text)


def device_proof(key: bytes, hello: bytes, challenge: bytes) -> bytes:
    """proof_d: over the HELLO and CHALLENGE payloads."""
    return hmac_sha256(key, DEVICE_LABEL, hello, challenge)


def server_proof(key: bytes, hello: bytes, challenge: bytes, auth: bytes) -> bytes:
    """proof_s: over the HELLO, CHALLENGE and AUTH payloads."""
    return hmac_sha256(key, SERVER_LABEL, hello, challenge, auth)


def _malformed(exc: ProtocolError) -> HandshakeError:
    if isinstance(exc, VersionError):
        return HandshakeError(frames.REJECT_VERSION, str(exc))
    return HandshakeError(frames.REJECT_MALFORMED, str(exc))


def _out_of_order(name: str, state: str) -> HandshakeError:
    return HandshakeError(frames.REJECT_MALFORMED,
                          "%s out of order: expected %s" % (name, _EXPECTING[state]))


def _nonce(nonce: Optional[bytes]) -> bytes:
    if nonce is None:
        return os.urandom(frames.NONCE_SIZE)
    if len(nonce) != frames.NONCE_SIZE:
        raise ValueError("a nonce is %d bytes" % frames.NONCE_SIZE)
    return bytes(nonce)


class DeviceHandshake:
    """The device's side: hello(), on_challenge() -> AUTH, on_welcome() -> host.

    An id and a secret go together.  A device with an id proves the secret in
    AUTH, and refuses a WELCOME whose proof_s is missing or wrong; a device
    without one refuses a WELCOME that carries a proof (malformed: it answers
    no question we asked).
    """

    def __init__(self, device_id: str, secret: Optional[bytes], window: int,
                 nonce: Optional[bytes] = None) -> None:
        if device_id and not valid_device_id(device_id):
            raise ValueError("bad device id")
        if bool(device_id) != bool(secret):
            raise ValueError("a device id needs a secret, and a secret an id")
        self.device_id = device_id
        self._key = secret or None
        self.window = window
        self._nonce = _nonce(nonce)
        self._hello = None          # type: Optional[bytes]
        self._challenge = b""
        self._auth = b""
        self._state = "start"
        self.peer_window = None     # type: Optional[int]
        self.host = None            # type: Optional[str]

    def __repr__(self) -> str:
        return "DeviceHandshake(id=%r, state=%s)" % (self.device_id, self._state)

    def hello(self) -> bytes:
        if self._hello is None:
            self._hello = frames.encode_hello(self._nonce, self.window, self.device_id)
            self._state = "challenge"
        return self._hello

    def on_challenge(self, payload) -> bytes:
        """The AUTH payload to send; HandshakeError when the CHALLENGE is malformed."""
        self._expect("challenge", "CHALLENGE")
        try:
            _, window = frames.decode_challenge(payload)
        except ProtocolError as exc:
            raise self._fail(_malformed(exc)) from None
        challenge = bytes(payload)
        if self._key is None:
            auth = frames.encode_auth()
        else:
            auth = frames.encode_auth(device_proof(self._key, self._hello, challenge))
        self._challenge, self._auth = challenge, auth
        self.peer_window = window
        self._state = "welcome"
        return auth

    def on_welcome(self, payload) -> str:
        """The "ADDR:PORT" where the server accepts this device's clients,
        once the server proved the secret (a device with an id)."""
        self._expect("welcome", "WELCOME")
        try:
            proof, host = frames.decode_welcome(payload)
        except ProtocolError as exc:
            raise self._fail(_malformed(exc)) from None
        if self._key is None:
            if proof:
                raise self._fail(HandshakeError(
                    frames.REJECT_MALFORMED, "WELCOME carries a proof for a HELLO without id"))
        else:
            expected = server_proof(self._key, self._hello, self._challenge, self._auth)
            if not proof:
                raise self._fail(self._unproven("no proof in its WELCOME"))
            if not compare_digest(proof, expected):
                raise self._fail(self._unproven("wrong proof"))
        self.host = host
        self._state = "done"
        return host

    def _unproven(self, why: str) -> HandshakeError:
        return HandshakeError(frames.REJECT_BAD_PROOF, "the server failed to prove the secret "
                              "for id %s (%s)" % (self.device_id, why))

    def _expect(self, state: str, name: str) -> None:
        if self._state != state:
            raise self._fail(_out_of_order(name, self._state))

    def _fail(self, error: HandshakeError) -> HandshakeError:
        self._state = "failed"
        return error
