"""What the observability tests share: file locations, the metrics contract, PromQL extraction.

PromQL has no Python parser, so metric names are found with a small tokenizer (strings,
label matchers, ranges and grouping clauses removed first); syntax is left to promtool and
to a real Prometheus, which do parse it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:  # CI (ASA_REQUIRE_POSTGRES=1) must have it: fail there instead of skipping
    if os.environ.get("ASA_REQUIRE_POSTGRES") == "1":
        raise
    pytest.skip("PyYAML not installed", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS_YML = REPO_ROOT / "prometheus.yml"
ALERTS_YML = REPO_ROOT / "observability" / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = REPO_ROOT / "observability" / "prometheus" / "alerts.test.yml"
COMPOSE_YML = REPO_ROOT / "docker-compose.observability.yml"
GRAFANA_DIR = REPO_ROOT / "observability" / "grafana"
DATASOURCES_YML = GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS_YML = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "asa.json"
OBSERVABILITY_MD = REPO_ROOT / "OBSERVABILITY.md"
QUICKSTART_MD = REPO_ROOT / "QUICKSTART_OBSERVABILITY.md"

# The backend's metrics: name -> (type, labels). Exposed names are derived below.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "llm_requests_total": ("counter", frozenset({"model", "status", "agent"})),
    "llm_tokens_total": ("counter", frozenset({"model", "token_type", "agent"})),
    "llm_cost_usd_total": ("counter", frozenset({"model", "agent"})),
    "llm_latency_seconds": ("histogram", frozenset({"model"})),
    "llm_unpriced_calls_total": ("counter", frozenset({"model"})),
    "llm_budget_blocked_total": ("counter", frozenset({"scope"})),
    "llm_budget_soft_limit_total": ("counter", frozenset({"scope"})),
    "llm_usage_spooled_total": ("counter", frozenset()),
    "llm_usage_spool_pending": ("gauge", frozenset()),
    "task_duration_seconds": ("histogram", frozenset({"status"})),
    "task_success_total": ("counter", frozenset({"status"})),
    "active_tasks": ("gauge", frozenset({"status"})),
    # Beyond the contract, exposed by app/observability.py:
    "llm_retries_total": ("counter", frozenset({"model"})),
    "llm_tracking_errors_total": ("counter", frozenset({"stage"})),
    "asa_database_breaker_open": ("gauge", frozenset()),
    "asa_database_breaker_trips_total": ("counter", frozenset()),
}
# The attributes every LLM span carries (error.type: failed calls only).
SPAN_ATTRIBUTES = (
    "llm.model",
    "llm.prompt_tokens",
    "llm.completion_tokens",
    "llm.total_tokens",
    "llm.cost_usd",
    "llm.latency_ms",
    "llm.task_id",
    "llm.user_id",
    "llm.status",
    "llm.agent",
    "llm.cached_tokens",
    "llm.reasoning_tokens",
    "llm.cost_status",
    "llm.request_id",
    "gen_ai.operation.name",
    "gen_ai.provider.name",  # gen_ai.system is deprecated, emitted only on request
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "gen_ai.response.id",
    "gen_ai.usage.cost",
    "error.type",
)

# The closed sets of label values, where the contract fixes them.
LABEL_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("llm_requests_total", "status"): frozenset({"success", "error", "blocked"}),
    ("llm_tokens_total", "token_type"): frozenset({"prompt", "completion", "cached", "reasoning"}),
    ("llm_budget_blocked_total", "scope"): frozenset(
        {"task", "user_daily", "user_monthly", "global_daily"}
    ),
    ("llm_budget_soft_limit_total", "scope"): frozenset(
        {"task", "user_daily", "user_monthly", "global_daily"}
    ),
    ("task_success_total", "status"): frozenset(
        {"succeeded", "failed", "budget_exceeded", "cancelled", "error"}
    ),
    ("task_duration_seconds", "status"): frozenset(
        {"succeeded", "failed", "budget_exceeded", "cancelled", "error"}
    ),
    ("active_tasks", "status"): frozenset({"queued", "running"}),
    ("llm_tracking_errors_total", "stage"): frozenset({"span", "write", "metrics", "settle"}),
}
# Series Prometheus itself creates for every target, and the labels it adds to all series.
PROMETHEUS_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"job", "instance", "service"})


def base_metric(series_name: str) -> str:
    """``llm_latency_seconds_bucket`` -> ``llm_latency_seconds``; other names unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        stem = series_name.removesuffix(suffix)
        if stem != series_name and METRICS.get(stem, ("",))[0] == "histogram":
            return stem
    return series_name


def exposed_series_names() -> frozenset[str]:
    names: set[str] = set()
    for name, (kind, _labels) in METRICS.items():
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(name)
    return frozenset(names)


def require_tool(name: str) -> str:
    """Path of an executable; skipped when absent, except in CI (ASA_REQUIRE_POSTGRES=1)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("ASA_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{name} is required (ASA_REQUIRE_POSTGRES=1) but not on PATH")
        pytest.skip(f"{name} not installed")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def documented_span_attributes() -> frozenset[str]:
    """Every attribute named in the first column of the span table of OBSERVABILITY.md."""
    section = OBSERVABILITY_MD.read_text().split("## Traces")[1].split("\n## ")[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([\w.]+)`", line.split("|")[1]))
    return frozenset(names)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return data


# --- PromQL sources ------------------------------------------------------------------------

# Grafana's variables, replaced by values a plain Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "$model": ".*",
    "$agent": ".*",
}


@dataclass(frozen=True)
class Query:
    source: str
    expr: str


def promql_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```promql\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def split_promql_block(block: str) -> list[str]:
    """The expressions of a promql fence: one per line; blank and ``#`` comment lines skipped."""
    return [
        line.strip()
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def doc_queries(path: Path) -> list[Query]:
    return [
        Query(f"{path.name}: {expr}", expr)
        for block in promql_blocks(path.read_text())
        for expr in split_promql_block(block)
    ]


def dashboard_queries(substitute: bool = True) -> list[Query]:
    queries = []
    for panel in iter_panels(load_dashboard()):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr is None:
                continue
            if substitute:
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
            queries.append(Query(f"dashboard panel {panel['title']!r} {target['refId']}", expr))
    return queries


def rule_queries() -> list[Query]:
    queries = []
    for group in load_yaml(ALERTS_YML)["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            queries.append(Query(f"rule {name}", " ".join(rule["expr"].split())))
    return queries


def recording_rule_names() -> frozenset[str]:
    return frozenset(
        rule["record"]
        for group in load_yaml(ALERTS_YML)["groups"]
        for rule in group["rules"]
        if "record" in rule
    )


def all_queries() -> list[Query]:
    return [
        *doc_queries(OBSERVABILITY_MD),
        *doc_queries(QUICKSTART_MD),
        *dashboard_queries(),
        *rule_queries(),
    ]


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


# --- metric names in an expression -----------------------------------------------------------

_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
        "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
    }
)  # fmt: skip
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric (series) names a PromQL expression selects."""
    text = re.sub(r"#[^\n]*", " ", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


_SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def label_matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every matcher written inside ``metric{...}``."""
    return [
        (metric, label, op, value)
        for metric, body in _SELECTOR.findall(expr)
        for label, op, value in _MATCHER.findall(body)
    ]


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_* clauses."""
    clauses = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    return {label.strip() for clause in clauses for label in clause.split(",") if label.strip()}
