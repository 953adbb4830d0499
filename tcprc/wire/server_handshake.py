"""The server's half of the protocol v2 handshake (wire.handshake has the
device's, the proofs and the rules both follow), without I/O.

Apart from wire.handshake so that a device, which never plays this role,
does not load its code (docs/benchmarks.md, third round).
"""

import os
from typing import Any, Callable, Optional

from . import frames
from .frames import ProtocolError
from .handshake import (AUTH_FAILED, HandshakeError, _malformed, _nonce, _out_of_order,
                        device_proof, server_proof)
from .mac import compare_digest


class ServerHandshake:
    """The server's side: on_hello() -> CHALLENGE, on_auth() checks the proof,
    welcome(host) -> WELCOME.

    `lookup(id)` gives the secret of a configured device id (or a list of
    secrets, any of which proves it: a rotation), None for an unknown one.  An unknown id gets a CHALLENGE like any other and fails at
    AUTH exactly as a wrong proof does (REJECT 2, AUTH_FAILED on the wire);
    only str() of the error, for the server's log, tells them apart.
    Afterwards: device_id ("" = anonymous; set from the HELLO even when the
    handshake fails), peer_window, authenticated (the device proved the
    secret of device_id), done.
    """

    def __init__(self, lookup: Callable[[str], Any], window: int,
                 legacy_allowed: bool, nonce: Optional[bytes] = None) -> None:
        self._lookup = lookup
        self.window = window
        self.legacy_allowed = legacy_allowed
        self._nonce = _nonce(nonce)
        self._keys = []             # type: List[bytes]
        self._key = None            # type: Optional[bytes]
        self._known = False
        self._hello = b""
        self._challenge = b""
        self._auth = b""
        self._state = "hello"
        self.device_id = ""
        self.peer_window = None     # type: Optional[int]
        self.authenticated = False
        self.done = False

    def __repr__(self) -> str:
        return "ServerHandshake(id=%r, state=%s)" % (self.device_id, self._state)

    def on_hello(self, payload) -> bytes:
        """The CHALLENGE payload to send."""
        self._expect("hello", "HELLO")
        try:
            _, window, device_id = frames.decode_hello(payload)
        except ProtocolError as exc:
            raise self._fail(_malformed(exc)) from None
        self.device_id = device_id
        if not device_id:
            if not self.legacy_allowed:
                raise self._fail(HandshakeError(
                    frames.REJECT_IDENTITY_REQUIRED, "HELLO without id: this server requires one"))
        else:
            found = self._lookup(device_id) or None
            self._known = found is not None
            # An unknown id is checked against a random key: AUTH takes the
            # same path and the same time, and fails.  A device may have two
            # secrets while one is being rotated: either proves it.
            if found is None:
                self._keys = [os.urandom(frames.PROOF_SIZE)]
            else:
                self._keys = [found] if isinstance(found, bytes) else list(found)
            self._key = self._keys[0]
        self.peer_window = window
        self._hello = bytes(payload)
        self._challenge = frames.encode_challenge(self._nonce, self.window)
        self._state = "auth"
        return self._challenge

    def on_auth(self, payload) -> None:
        """Returns when the device may have its session; raises otherwise."""
        self._expect("auth", "AUTH")
        try:
            proof = frames.decode_auth(payload)
        except ProtocolError as exc:
            raise self._fail(_malformed(exc)) from None
        if self._key is None:
            if proof:
                raise self._fail(HandshakeError(
                    frames.REJECT_MALFORMED, "AUTH carries a proof for a HELLO without id"))
        else:
            # compare_digest against every key, also when the proof is missing:
            # one path, one timing.
            matches = False
            for key in self._keys:
                if compare_digest(proof or bytes(frames.PROOF_SIZE),
                                          device_proof(key, self._hello, self._challenge)):
                    matches, self._key = True, key
            if not (matches and proof and self._known):
                why = "bad proof for id %s" if self._known else "unknown id %s"
                raise self._fail(HandshakeError(frames.REJECT_BAD_PROOF,
                                                why % self.device_id, AUTH_FAILED))
            self.authenticated = True
        self._auth = bytes(payload)
        self._state = "done"
        self.done = True

    def welcome(self, host: str) -> bytes:
        """The WELCOME payload: the host, and proof_s when the device authenticated."""
        if not self.done:
            raise ValueError("WELCOME before the device passed AUTH")
        proof = b""
        if self.authenticated:
            proof = server_proof(self._key, self._hello, self._challenge, self._auth)
        return frames.encode_welcome(host, proof)

    def _expect(self, state: str, name: str) -> None:
        if self._state != state:
            raise self._fail(_out_of_order(name, self._state))

    def _fail(self, error: HandshakeError) -> HandshakeError:
        self._state = "failed"
        self._key = None
        self._keys = []
        return error
