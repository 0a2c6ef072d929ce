"""Shared test configuration and fixtures.

Async tests run on asyncio unless a test asks for trio (for example to use trio's
``MockClock`` as a virtual clock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from natsserver import nats_server  # noqa: F401  (a fixture for every test module)
from pgtest import schema  # noqa: F401  (a fixture for every test module)
from simbus import funded_config
from wsservers import make_certificate

from upbus.sim import SimConfig, Simulator


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sim_config() -> SimConfig:
    """What the ``sim`` fixture runs; a module overrides this fixture to change the rate."""
    return funded_config(rate=400.0)


@pytest.fixture
async def sim(sim_config: SimConfig) -> AsyncIterator[Simulator]:
    """A running simulator (``sim_config``) for the test; stopped after it."""
    async with Simulator(sim_config) as simulator:
        yield simulator


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (``cert.pem``) and key (``key.pem``) for 127.0.0.1."""
    return make_certificate(tmp_path_factory.mktemp("tls"))
