"""The simulator's mutable state, safe to share between the server thread and the test thread.

``SimulatorState.stats()`` is what ``GET /sim/stats`` returns::

    {"requests": 12,          # POST /v1/chat/completions received, valid or not
     "invalid": 0,            # of those, rejected as malformed requests (400, not a fault)
     "streams": 3,            # of those, with stream=true
     "succeeded": 9,          # answered in full with honest usage (a stream: [DONE] was sent)
     "faults": {"429": 2, "500": 0, ...},   # every fault name, requests it was injected into
     "by_model": {"gpt-4o-mini": 12},
     "billed_usage": {"prompt_tokens": .., "completion_tokens": .., "total_tokens": ..,
                      "cached_tokens": .., "reasoning_tokens": ..},   # summed over succeeded
     "response_ids": ["chatcmpl-..", ...]}  # succeeded, oldest first, the last 10 000

A ``timeout`` fault whose answer the client waited for counts both as a fault and as succeeded.
``reset()`` (``POST /sim/reset``) zeroes the counters and returns scripts, their positions, the
fault schedule, the fault dice and the prompt cache to what the config says.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from app.simulator.config import (
    FAULT_NAMES,
    FaultName,
    ScheduledFault,
    ScriptedReply,
    ScriptRule,
    SimulatorConfig,
    load_script_file,
)
from app.simulator.tokens import TokenUsage

MAX_RESPONSE_IDS = 10_000


@dataclass
class _PendingFault:
    fault: FaultName
    remaining: int


@dataclass
class _ActiveRule:
    rule: ScriptRule
    patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)
    served: int = 0

    @classmethod
    def compile(cls, rule: ScriptRule) -> _ActiveRule:
        active = cls(rule)
        if rule.regex:
            for key in ("match_user", "match_system", "match_model"):
                pattern = getattr(rule, key)
                if pattern is not None:
                    active.patterns[key] = re.compile(pattern)
        return active

    def _matches(self, key: str, text: str) -> bool:
        expected: str | None = getattr(self.rule, key)
        if expected is None:
            return True
        if key in self.patterns:
            return self.patterns[key].search(text) is not None
        return expected in text

    def matches(self, *, model: str, system: str, user: str) -> bool:
        return (
            self._matches("match_model", model)
            and self._matches("match_system", system)
            and self._matches("match_user", user)
        )

    def next_reply(self) -> ScriptedReply | None:
        """The reply for this request, advancing the sequence; None when the rule is spent."""
        replies = self.rule.replies
        if self.served >= len(replies) and self.rule.after_last == "stop":
            return None
        if self.rule.after_last == "cycle":
            reply = replies[self.served % len(replies)]
        else:
            reply = replies[min(self.served, len(replies) - 1)]
        self.served += 1
        return reply


class SimulatorState:
    """Counters, scripts, fault schedule and prompt cache behind one lock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.closing = threading.Event()  # set while the server shuts down: waits end early
        self._file_rules = load_script_file(config.scripts_path) if config.scripts_path else []
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._runtime_rules: list[_ActiveRule] = []
        self._config_rules = [
            _ActiveRule.compile(rule) for rule in [*self.config.scripts, *self._file_rules]
        ]
        self._schedule = deque(
            _PendingFault(item.fault, item.times) for item in self.config.fault_schedule
        )
        self._dice = random.Random(self.config.seed)  # noqa: S311 - simulation, not security
        self._prompt_cache: OrderedDict[str, None] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._by_model: Counter[str] = Counter()
        self._billed: Counter[str] = Counter()
        self._response_ids: deque[str] = deque(maxlen=MAX_RESPONSE_IDS)

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()

    # Scripts and faults

    def add_scripts(self, rules: list[ScriptRule]) -> None:
        """Add rules at runtime; they are tried before the config's, the newest first."""
        with self._lock:
            self._runtime_rules[:0] = [_ActiveRule.compile(rule) for rule in reversed(rules)]

    def schedule_fault(self, fault: FaultName, times: int = 1) -> None:
        """Fail the next ``times`` requests (after any already scheduled) with ``fault``."""
        self.extend_schedule([ScheduledFault(fault=fault, times=times)])

    def extend_schedule(self, items: list[ScheduledFault]) -> None:
        with self._lock:
            self._schedule.extend(_PendingFault(item.fault, item.times) for item in items)

    def next_reply(self, *, model: str, system: str, user: str) -> ScriptedReply | None:
        """The first matching rule's next reply, or None when no rule answers."""
        with self._lock:
            for active in [*self._runtime_rules, *self._config_rules]:
                if active.matches(model=model, system=system, user=user):
                    reply = active.next_reply()
                    if reply is not None:
                        return reply
        return None

    def next_unscripted_fault(self) -> FaultName | None:
        """The next scheduled fault, else one drawn from ``fault_rates``, else None."""
        with self._lock:
            if self._schedule:
                head = self._schedule[0]
                head.remaining -= 1
                if head.remaining == 0:
                    self._schedule.popleft()
                return head.fault
            if not self.config.fault_rates:
                return None
            roll = self._dice.random()
            for name in FAULT_NAMES:
                roll -= self.config.fault_rates.get(name, 0.0)
                if roll < 0:
                    return name
        return None

    # Prompt caching

    def cached_tokens(self, digests: list[tuple[str, int]]) -> int:
        """Cached tokens for a prompt with these prefix digests, then remember its prefixes."""
        config = self.config
        if not config.prompt_cache:
            return 0
        with self._lock:
            hit = max(
                (tokens for digest, tokens in digests if digest in self._prompt_cache), default=0
            )
            for digest, _ in digests:
                self._prompt_cache[digest] = None
                self._prompt_cache.move_to_end(digest)
            while len(self._prompt_cache) > config.prompt_cache_entries:
                self._prompt_cache.popitem(last=False)
        if hit < max(config.cache_min_tokens, 1):
            return 0
        step = config.cache_increment_tokens
        return config.cache_min_tokens + (hit - config.cache_min_tokens) // step * step

    # Counters

    def record_request(self, *, model: str | None, stream: bool) -> None:
        with self._lock:
            self._counts["requests"] += 1
            if model is None:
                self._counts["invalid"] += 1
                return
            self._by_model[model] += 1
            if stream:
                self._counts["streams"] += 1

    def record_fault(self, fault: FaultName) -> None:
        with self._lock:
            self._faults[fault] += 1

    def record_success(self, response_id: str, usage: TokenUsage) -> None:
        with self._lock:
            self._counts["succeeded"] += 1
            self._billed.update(
                prompt_tokens=usage.prompt,
                completion_tokens=usage.completion,
                total_tokens=usage.total,
                cached_tokens=usage.cached,
                reasoning_tokens=usage.reasoning,
            )
            self._response_ids.append(response_id)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._counts["requests"],
                "invalid": self._counts["invalid"],
                "streams": self._counts["streams"],
                "succeeded": self._counts["succeeded"],
                "faults": {name: self._faults[name] for name in FAULT_NAMES},
                "by_model": dict(self._by_model),
                "billed_usage": {
                    key: self._billed[key]
                    for key in (
                        "prompt_tokens",
                        "completion_tokens",
                        "total_tokens",
                        "cached_tokens",
                        "reasoning_tokens",
                    )
                },
                "response_ids": list(self._response_ids),
            }
