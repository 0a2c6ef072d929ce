"""The names upbus uses on NATS: KV buckets, keys and subjects.

Every name starts with ``nats.prefix`` (default ``upbus``), so two deployments can
share a server. Market data goes to one subject per (type, code) and leadership
epoch, so a remote bus subscribes to exactly the keys it wants, and a message of a
former leader can never reach it after it has moved to the new one.
"""

from __future__ import annotations

__all__ = (
    "LEADER_KEY",
    "data_subject",
    "events_subject",
    "gateway_bucket",
    "leases_bucket",
    "private_subject",
)

LEADER_KEY = "leader"
"""The key, in the gateway bucket, that the leading gateway holds and renews."""


def leases_bucket(prefix: str) -> str:
    """The KV bucket of remote buses' leases: one key per remote bus and channel."""
    return f"{prefix}_leases"


def gateway_bucket(prefix: str) -> str:
    """The KV bucket holding the leader key."""
    return f"{prefix}_gateway"


def _token(kind: str) -> str:
    # "candle.1s" would be two subject tokens.
    return kind.replace(".", "_")


def data_subject(prefix: str, epoch: str, kind: str, code: str) -> str:
    """Where the leader of ``epoch`` publishes public messages of ``kind`` for ``code``."""
    return f"{prefix}.md.{epoch}.{_token(kind)}.{code}"


def private_subject(prefix: str, account: str, epoch: str, kind: str) -> str:
    """Where the leader of ``epoch`` publishes ``account``'s myOrder or myAsset messages."""
    return f"{prefix}.private.{account}.{epoch}.{_token(kind)}"


def events_subject(prefix: str, epoch: str) -> str:
    """Where the leader of ``epoch`` announces its own connections' gaps."""
    return f"{prefix}.events.{epoch}"
