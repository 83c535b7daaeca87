"""A simulator served over real HTTP, shared by the module, reset before every test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from app.simulator import SimulatorConfig, SimulatorServer

TEST_CONFIG = SimulatorConfig(retry_after_seconds=0.01, timeout_fault_seconds=5.0)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(TEST_CONFIG) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_sim(request: pytest.FixtureRequest) -> None:
    if "sim" in request.fixturenames:
        server: SimulatorServer = request.getfixturevalue("sim")
        server.state.reset()


@pytest.fixture
def client(sim: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="sim", base_url=sim.base_url, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def async_client(sim: SimulatorServer) -> Callable[[], openai.AsyncOpenAI]:
    """Makes an async client; use it as ``async with async_client() as client`` in the test,
    so that it lives and dies on the test's own event loop."""
    return lambda: openai.AsyncOpenAI(
        api_key="sim", base_url=sim.base_url, max_retries=0, timeout=10
    )
