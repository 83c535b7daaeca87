"""An OpenAI-compatible LLM simulator for tests, benchmarks and offline runs.

``SimulatorServer(config)`` serves ``create_app(config)`` on loopback; point an OpenAI client at
its ``base_url``. The config and script format are in ``app.simulator.config``, the endpoints and
``x-sim-*`` headers in ``app.simulator.app``, the ``/sim/stats`` shape in ``app.simulator.state``.
"""

from app.simulator.app import create_app
from app.simulator.config import (
    FAULT_NAMES,
    FaultName,
    ScheduledFault,
    ScriptedReply,
    ScriptedToolCall,
    ScriptRule,
    SimulatorConfig,
    UsageOverride,
)
from app.simulator.server import SimulatorError, SimulatorServer
from app.simulator.state import SimulatorState

__all__ = [
    "FAULT_NAMES",
    "FaultName",
    "ScheduledFault",
    "ScriptRule",
    "ScriptedReply",
    "ScriptedToolCall",
    "SimulatorConfig",
    "SimulatorError",
    "SimulatorServer",
    "SimulatorState",
    "UsageOverride",
    "create_app",
]
