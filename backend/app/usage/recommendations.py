"""Where the money goes to waste, with the figures behind each finding.

``build_recommendations`` reads one window of whole UTC days, for one user or for everyone:

- **waste**, from the daily rollups' waste sums (revision 0016; ``usage_rollup_user_daily`` for
  a user, ``usage_rollup_daily_overall`` for everyone, never the ledger's rows): the spend of
  failed calls (``status = error``), of truncated answers (``finish_reason = length``), of calls
  the SDK had to retry (``attempts > 1``), and how many calls a budget blocked (they cost
  nothing, but the work that needed them did not happen);
- **cache**, from the daily rollups: cached prompt tokens over prompt tokens, per model;
- **tasks by model** and **by agent and model**, from the finished tasks (by ``finished_at``)
  and their spend (a task's total from ``usage_rollup_task_total``; per agent and model from
  ``usage_rollup_daily``), read from the outcome rollups kept at each finish and corrected for
  the calls that came later (``app.usage.outcomes``): success rate and the **cost per fixed
  bug** (spend of succeeded tasks over their number), the spend of failed tasks beside it, and
  the all-in cost per fixed bug (all the spend over the fixed bugs: what a fixed bug costs once
  failures are paid for).
  Cancelled tasks are left out of both (their owner stopped them);
- **a cheaper model**, per repository and over all of them: model B is named beside model A
  when both finished at least ``RECOMMENDATION_MIN_TASKS`` tasks there, B's all-in cost per
  fixed bug is lower, and B's success rate is not below A's by more than the one-sided 95 %
  sampling margin of the difference (so "as often" is said only where the samples support it;
  the sample sizes are in the figures).

Each finding is a ``Recommendation``: a kind, a sentence, its figures and, where it can be
counted, the spend it would have saved.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Connection, cast, func, select

from app.core.money import pico_to_usd
from app.models import UsageRollupDailyOverall, UsageRollupUserDaily
from app.usage.outcomes import ALL_REPOSITORIES as ALL_REPOSITORIES
from app.usage.outcomes import FAILED as FAILED
from app.usage.outcomes import (
    SUCCEEDED,
    agent_outcome_sums,
    model_outcome_sums,
    repo_outcome_sums,
)
from app.usage.queries import UsageSums, rollup_usage_groups

Z_95_ONE_SIDED = 1.6449
LOW_CACHE_RATIO = 0.2
LOW_CACHE_MIN_PROMPT_TOKENS = 100_000
WASTE_SHARE = Decimal("0.05")  # a kind of waste is named once it is 5 % of the spend
_USD = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class Waste:
    requests: int = 0
    spend_pico: int = 0
    failed_calls: int = 0
    failed_pico: int = 0
    truncated_calls: int = 0
    truncated_pico: int = 0
    retried_calls: int = 0
    extra_attempts: int = 0
    retried_pico: int = 0
    blocked_calls: int = 0


@dataclass(frozen=True, slots=True)
class CacheUse:
    model: str
    prompt_tokens: int
    cached_tokens: int

    @property
    def hit_ratio(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass(slots=True)
class TaskOutcomes:
    """Finished tasks of one group: how many succeeded or failed and what each side spent."""

    succeeded: int = 0
    failed: int = 0
    succeeded_pico: int = 0
    failed_pico: int = 0

    @property
    def tasks(self) -> int:
        return self.succeeded + self.failed

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.tasks if self.tasks else None

    @property
    def cost_per_fixed_bug(self) -> Decimal | None:
        return _per(self.succeeded_pico, self.succeeded)

    @property
    def all_in_cost_per_fixed_bug(self) -> Decimal | None:
        return _per(self.succeeded_pico + self.failed_pico, self.succeeded)

    def add(self, status: str, tasks: int, pico: int) -> None:
        if status == SUCCEEDED:
            self.succeeded += tasks
            self.succeeded_pico += pico
        else:
            self.failed += tasks
            self.failed_pico += pico


def _per(pico: int, count: int) -> Decimal | None:
    return (pico_to_usd(pico) / count).quantize(_USD) if count else None


@dataclass(frozen=True, slots=True)
class Recommendation:
    kind: str
    message: str
    figures: dict[str, Any]
    estimated_savings_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Report:
    user_id: str | None
    since: date
    until: date  # inclusive
    waste: Waste
    cache: list[CacheUse]
    models: dict[str, TaskOutcomes]
    agents: dict[tuple[str, str], TaskOutcomes]
    recommendations: list[Recommendation] = field(default_factory=list)


# -- reads --------------------------------------------------------------------------------------


def _sum(column: Any) -> Any:
    return cast(func.coalesce(func.sum(column), 0), BigInteger)


def read_waste(conn: Connection, user_id: str | None, since: date, until: date) -> Waste:
    """The waste figures of the calls made on the UTC days ``since`` to ``until`` (inclusive),
    from the daily rollups: the user's (through its (user_id, day) key) or everyone's."""
    r: Any = UsageRollupUserDaily if user_id is not None else UsageRollupDailyOverall
    columns = (
        r.requests, r.cost_pico_usd, r.errors, r.error_cost_pico_usd, r.truncated_calls,
        r.truncated_cost_pico_usd, r.retried_calls, r.retry_attempts, r.retried_cost_pico_usd,
        r.blocked,
    )  # fmt: skip
    query = select(*(_sum(column) for column in columns)).where(r.day >= since, r.day <= until)
    if user_id is not None:
        query = query.where(r.user_id == user_id)
    return Waste(*(int(v or 0) for v in conn.execute(query).one()))


def read_cache_use(
    conn: Connection, user_id: str | None, since: date, until: date
) -> list[CacheUse]:
    """Prompt and cached prompt tokens per model, from the daily rollups."""
    by_model: dict[str, list[UsageSums]] = defaultdict(list)
    for group in rollup_usage_groups(
        conn, user_id=user_id, since_day=since, until_day=until + timedelta(days=1), by_agent=False
    ):
        by_model[group.model].append(group.sums)
    uses = []
    for model, parts in sorted(by_model.items()):
        counts = UsageSums.total(parts).counts()
        uses.append(CacheUse(model, counts["prompt_tokens"], counts["cached_tokens"]))
    return uses


def _days(start: datetime, end: datetime) -> tuple[date, date]:
    """The first and last UTC day of the window [start, end) of whole UTC days."""
    first, after = start.astimezone(UTC), end.astimezone(UTC)
    if first.time() != time.min or after.time() != time.min:
        raise ValueError(f"Not a window of whole UTC days: [{start}, {end})")
    return first.date(), after.date() - timedelta(days=1)


def read_task_outcomes(
    conn: Connection, user_id: str | None, start: datetime, end: datetime, min_tasks: int = 0
) -> dict[tuple[str, str], TaskOutcomes]:
    """Finished tasks per (repository, model), with their spend (a task's total in the per-task
    total; a task without calls has none), for the window [start, end) of whole UTC days (as
    ``window_bounds`` gives): from the outcome rollups (``app.usage.outcomes``), exact. Only
    the pairs of at least ``min_tasks`` tasks (fewer are never compared: cheaper for
    everyone)."""
    since, until = _days(start, end)
    found: dict[tuple[str, str], TaskOutcomes] = defaultdict(TaskOutcomes)
    for repo, model, status, tasks, pico in repo_outcome_sums(
        conn, user_id, since, until, min_tasks
    ):
        found[(repo, model)].add(status, tasks, pico)
    return dict(found)


def read_model_outcomes(
    conn: Connection, user_id: str | None, start: datetime, end: datetime
) -> dict[str, TaskOutcomes]:
    """``read_task_outcomes`` summed over the repositories: per model, every finished task."""
    found: dict[str, TaskOutcomes] = defaultdict(TaskOutcomes)
    for _all, model, status, tasks, pico in model_outcome_sums(conn, user_id, *_days(start, end)):
        found[model].add(status, tasks, pico)
    return dict(found)


def read_agent_outcomes(
    conn: Connection, user_id: str | None, start: datetime, end: datetime
) -> dict[tuple[str, str], TaskOutcomes]:
    """Per (agent, model the agent called): the finished tasks it worked on and its spend, for
    the window [start, end) of whole UTC days, from the outcome rollups, exact."""
    found: dict[tuple[str, str], TaskOutcomes] = defaultdict(TaskOutcomes)
    for agent, model, status, tasks, pico in agent_outcome_sums(conn, user_id, *_days(start, end)):
        found[(agent or "(none)", model)].add(status, tasks, pico)
    return dict(found)


# -- findings -----------------------------------------------------------------------------------


def _usd(pico: int) -> Decimal:
    return pico_to_usd(pico)


def waste_findings(waste: Waste) -> list[Recommendation]:
    """A finding for each kind of waste that is at least ``WASTE_SHARE`` of the spend."""
    found: list[Recommendation] = []
    if waste.spend_pico <= 0:
        return found
    total = Decimal(waste.spend_pico)
    kinds = (
        ("failed_calls", waste.failed_calls, waste.failed_pico,
         "calls that ended in an error still cost"),
        ("truncated_answers", waste.truncated_calls, waste.truncated_pico,
         "answers cut at max_tokens (finish_reason=length) cost; raise max_tokens or ask for "
         "less"),
        ("retried_calls", waste.retried_calls, waste.retried_pico,
         "calls the client had to retry cost"),
    )  # fmt: skip
    for kind, calls, pico, what in kinds:
        if calls and Decimal(pico) / total >= WASTE_SHARE:
            share = Decimal(pico) / total
            found.append(
                Recommendation(
                    kind=kind,
                    message=f"{calls} {what} ${_usd(pico)}, {share:.1%} of the spend.",
                    figures={
                        "calls": calls,
                        "spend_usd": _usd(pico),
                        "share_of_spend": round(float(share), 4),
                        "total_spend_usd": _usd(waste.spend_pico),
                        "extra_attempts": waste.extra_attempts if kind == "retried_calls" else None,
                    },
                    estimated_savings_usd=_usd(pico) if kind == "failed_calls" else None,
                )
            )
    if (
        waste.blocked_calls
        and waste.requests
        and (Decimal(waste.blocked_calls) / waste.requests >= WASTE_SHARE)
    ):
        share = Decimal(waste.blocked_calls) / waste.requests
        found.append(
            Recommendation(
                kind="blocked_calls",
                message=(
                    f"{waste.blocked_calls} calls ({share:.1%}) were blocked by a budget: the "
                    "work that needed them stopped. Raise the limit or lower the task's cost."
                ),
                figures={"calls": waste.blocked_calls, "requests": waste.requests},
            )
        )
    return found


def cache_findings(uses: Iterable[CacheUse]) -> list[Recommendation]:
    found = []
    for use in uses:
        ratio = use.hit_ratio
        if ratio is None or use.prompt_tokens < LOW_CACHE_MIN_PROMPT_TOKENS:
            continue
        if ratio < LOW_CACHE_RATIO:
            found.append(
                Recommendation(
                    kind="low_cache_hit",
                    message=(
                        f"Only {ratio:.1%} of {use.prompt_tokens} prompt tokens to {use.model} "
                        "were served from the provider's cache: put the stable part of the "
                        "prompt (instructions, repository map) first and keep it unchanged."
                    ),
                    figures={
                        "model": use.model,
                        "prompt_tokens": use.prompt_tokens,
                        "cached_tokens": use.cached_tokens,
                        "hit_ratio": round(ratio, 4),
                    },
                )
            )
    return found


def not_worse(candidate: TaskOutcomes, incumbent: TaskOutcomes) -> bool:
    """The candidate's success rate is not below the incumbent's by more than the one-sided
    95 % sampling margin of the difference of the two rates."""
    p1, n1 = incumbent.success_rate or 0.0, incumbent.tasks
    p2, n2 = candidate.success_rate or 0.0, candidate.tasks
    # Pooled variance, so two perfect (or two hopeless) records still have a margin.
    pooled = (incumbent.succeeded + candidate.succeeded) / (n1 + n2)
    margin = Z_95_ONE_SIDED * math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return p2 >= p1 - margin


def cheaper_model_findings(
    outcomes: dict[tuple[str, str], TaskOutcomes],
    min_tasks: int,
    overall: dict[str, TaskOutcomes] | None = None,
) -> list[Recommendation]:
    """Per repository (and over all), a cheaper model that fixed as often, when there is one.

    ``overall`` is per model over every repository, when ``outcomes`` holds only the pairs of
    at least ``min_tasks`` tasks (None: summed from ``outcomes``, then all of them)."""
    by_repo: dict[str, dict[str, TaskOutcomes]] = defaultdict(dict)
    summed: dict[str, TaskOutcomes] = defaultdict(TaskOutcomes)
    for (repo, model), result in outcomes.items():
        by_repo[repo][model] = result
        total = summed[model]
        total.add(SUCCEEDED, result.succeeded, result.succeeded_pico)
        total.add("failed", result.failed, result.failed_pico)
    by_repo[ALL_REPOSITORIES] = dict(summed) if overall is None else overall
    found = []
    for repo, models in sorted(by_repo.items()):
        eligible = {
            m: (o, cost)
            for m, o in models.items()
            if o.tasks >= min_tasks and (cost := o.all_in_cost_per_fixed_bug) is not None
        }
        for model, (incumbent, cost) in sorted(eligible.items()):
            options = [
                (other_cost, other, candidate)
                for other, (candidate, other_cost) in eligible.items()
                if other != model and other_cost < cost and not_worse(candidate, incumbent)
            ]
            if options:
                cheaper, other, candidate = min(options, key=lambda o: (o[0], o[1]))
                finding = _cheaper_model(repo, model, incumbent, cost, other, candidate, cheaper)
                found.append(finding)
    return found


def _cheaper_model(
    repo: str,
    model: str,
    incumbent: TaskOutcomes,
    cost: Decimal,
    other: str,
    candidate: TaskOutcomes,
    cheaper: Decimal,
) -> Recommendation:
    where = "all repositories" if repo == ALL_REPOSITORIES else repo
    saving = ((cost - cheaper) * incumbent.succeeded).quantize(_USD)
    return Recommendation(
        kind="cheaper_model",
        message=(
            f"On {where}, {other} fixed {candidate.succeeded} of {candidate.tasks} tasks at "
            f"${cheaper} per fixed bug; {model} fixed {incumbent.succeeded} of "
            f"{incumbent.tasks} at ${cost}. {other} fixes as often within the samples' margin."
        ),
        figures={
            "repository": None if repo == ALL_REPOSITORIES else repo,
            "model": model,
            "model_tasks": incumbent.tasks,
            "model_succeeded": incumbent.succeeded,
            "model_cost_per_fixed_bug_usd": cost,
            "cheaper_model": other,
            "cheaper_model_tasks": candidate.tasks,
            "cheaper_model_succeeded": candidate.succeeded,
            "cheaper_model_cost_per_fixed_bug_usd": cheaper,
        },
        estimated_savings_usd=saving,
    )


def window_bounds(today: date, days: int) -> tuple[date, date, datetime, datetime]:
    """The window's first and last day and its [start, end) instants."""
    since = today - timedelta(days=days - 1)
    start = datetime.combine(since, time.min, tzinfo=UTC)
    end = datetime.combine(today + timedelta(days=1), time.min, tzinfo=UTC)
    return since, today, start, end


def build_recommendations(
    conn: Connection, user_id: str | None, now: datetime, days: int, min_tasks: int
) -> Report:
    """Everything above for ``user_id`` (None: everyone) over the ``days`` UTC days to ``now``."""
    since, until, start, end = window_bounds(now.astimezone(UTC).date(), days)
    waste = read_waste(conn, user_id, since, until)
    cache = read_cache_use(conn, user_id, since, until)
    # Pairs of fewer than min_tasks tasks are never compared: not read (a month of everyone's
    # tasks spans tens of thousands of pairs); the per-model figures come from their own rows.
    outcomes = read_task_outcomes(conn, user_id, start, end, min_tasks)
    models = read_model_outcomes(conn, user_id, start, end)
    agents = read_agent_outcomes(conn, user_id, start, end)
    findings = [
        *waste_findings(waste),
        *cache_findings(cache),
        *cheaper_model_findings(outcomes, min_tasks, models),
    ]
    return Report(user_id, since, until, waste, cache, models, agents, findings)
