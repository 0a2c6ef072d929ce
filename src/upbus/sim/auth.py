"""Private-endpoint authentication: ``Authorization: Bearer <JWT>``.

See docs/protocol.md, Private channel.

The token is HMAC-signed (HS256, HS384 or HS512) with the account's raw secret key and
carries ``access_key`` and ``nonce`` claims. ``alg: none``, other algorithms, unknown
keys, bad signatures, missing claims and (optionally) reused nonces are refused.
"""

from __future__ import annotations

import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jwt

__all__ = ("ALGORITHMS", "AuthError", "Authenticator", "unverified_access_key")

ALGORITHMS = ("HS256", "HS384", "HS512")
_NONCES_KEPT = 100_000


class AuthError(Exception):
    """The upgrade's credentials were refused; the message says why, never the secret."""


def _token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization is not a Bearer token")
    return token.strip()


def unverified_access_key(authorization: str | None) -> str | None:
    """The ``access_key`` claim without checking anything (to pick a rate-limit scope)."""
    try:
        claims = jwt.decode(_token(authorization), options={"verify_signature": False})
    except (AuthError, jwt.PyJWTError):
        return None
    key = claims.get("access_key")
    return key if isinstance(key, str) else None


class Authenticator:
    """Verifies tokens against ``secrets`` (access key → secret key)."""

    def __init__(
        self,
        secrets: Mapping[str, str],
        *,
        reject_reused_nonce: bool,
        require_uuid_nonce: bool,
    ) -> None:
        self._secrets = dict(secrets)
        self._reject_reused_nonce = reject_reused_nonce
        self._require_uuid_nonce = require_uuid_nonce
        self._nonces: OrderedDict[tuple[str, str], None] = OrderedDict()

    def verify(self, authorization: str | None) -> tuple[str, dict[str, Any]]:
        """The access key and claims of a valid token; raises :class:`AuthError`."""
        token = _token(authorization)
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise AuthError(f"algorithm {algorithm!r} is not accepted")
        access_key = claims.get("access_key")
        if not isinstance(access_key, str) or access_key not in self._secrets:
            raise AuthError("unknown access_key")
        try:
            with warnings.catch_warnings():
                # Real secret keys are 40 characters, shorter than HS512's digest;
                # PyJWT warns about that, the exchange does not care.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                jwt.decode(token, self._secrets[access_key], algorithms=[algorithm])
        except jwt.PyJWTError as exc:
            raise AuthError(f"token rejected: {exc}") from None
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise AuthError("no nonce claim")
        if self._require_uuid_nonce:
            try:
                uuid.UUID(nonce)
            except ValueError:
                raise AuthError("nonce is not a UUID") from None
        if self._reject_reused_nonce:
            seen = (access_key, nonce)
            if seen in self._nonces:
                raise AuthError("nonce was used before")
            self._nonces[seen] = None
            if len(self._nonces) > _NONCES_KEPT:
                self._nonces.popitem(last=False)
        return access_key, claims
