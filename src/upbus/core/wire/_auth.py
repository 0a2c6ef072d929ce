"""Authentication of the private channel: a fresh JWT on every connect."""

from __future__ import annotations

import hashlib
import uuid
import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import SecretStr

__all__ = ("account_digest", "bearer_headers", "make_token")


def make_token(access_key: SecretStr, secret_key: SecretStr, algorithm: str = "HS512") -> str:
    """A JWT with the ``access_key`` and a new UUID ``nonce``, signed with the raw secret.

    The exchange wants no ``query_hash`` for WebSocket connects and no expiry claim;
    a fresh nonce per connect keeps a replayed token useless.
    """
    payload = {"access_key": access_key.get_secret_value(), "nonce": str(uuid.uuid4())}
    with warnings.catch_warnings():
        # The exchange issues the keys; their length is not ours to choose, so
        # PyJWT's advice on HMAC key length would only be noise on every connect.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret_key.get_secret_value().encode(), algorithm=algorithm)


def account_digest(access_key: SecretStr) -> str:
    """A short name for the account of ``access_key`` that does not reveal the key."""
    return hashlib.sha256(access_key.get_secret_value().encode()).hexdigest()[:12]


def bearer_headers(access_key: SecretStr, secret_key: SecretStr, algorithm: str) -> dict[str, str]:
    """The upgrade request's ``Authorization`` header."""
    return {"Authorization": f"Bearer {make_token(access_key, secret_key, algorithm)}"}
