"""Every PromQL expression we publish (docs, dashboard, alert rules) parses and fits the
metrics contract."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.observability import (
    LABEL_VALUES,
    METRICS,
    PROMETHEUS_SERIES,
    TARGET_LABELS,
    Query,
    all_queries,
    base_metric,
    exposed_series_names,
    grouping_labels,
    label_matchers,
    metric_names,
    recording_rule_names,
    require_tool,
)

QUERIES = all_queries()


def test_queries_are_found_in_every_source() -> None:
    sources = {query.source.split(":")[0].split(" ")[0] for query in QUERIES}
    assert {"OBSERVABILITY.md", "QUICKSTART_OBSERVABILITY.md", "dashboard", "rule"} <= sources
    assert len(QUERIES) >= 40


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    # promtool has no "check expression" command; a rule file of recording rules is parsed
    # with the same PromQL parser.
    import yaml

    rules = [{"record": f"asa_check:query_{i}", "expr": q.expr} for i, q in enumerate(QUERIES)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    sources = "\n".join(f"query_{i}: {q.source}" for i, q in enumerate(QUERIES))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{sources}"


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.source[:80])
def test_query_selects_only_contract_series(query: Query) -> None:
    allowed = exposed_series_names() | recording_rule_names() | PROMETHEUS_SERIES
    assert metric_names(query.expr) <= allowed


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.source[:80])
def test_query_uses_only_labels_its_metrics_have(query: Query) -> None:
    labels: set[str] = set(TARGET_LABELS)
    for name in metric_names(query.expr):
        metric = base_metric(name)
        if metric in METRICS:
            kind, metric_labels = METRICS[metric]
            labels |= metric_labels
            if kind == "histogram" and name.endswith("_bucket"):
                labels.add("le")
    used = grouping_labels(query.expr) | {
        label for _m, label, _op, _v in label_matchers(query.expr)
    }
    assert used <= labels


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.source[:80])
def test_query_matches_only_label_values_the_backend_emits(query: Query) -> None:
    for metric, label, op, value in label_matchers(query.expr):
        allowed = LABEL_VALUES.get((base_metric(metric), label))
        if allowed is not None and op in {"=", "!="}:
            assert value in allowed, (metric, label, value)
        if label == "job":
            assert value == "asa-backend"


def test_label_matcher_extraction_sees_matchers() -> None:
    assert label_matchers('rate(llm_requests_total{status="success", model=~"gpt.*"}[5m])') == [
        ("llm_requests_total", "status", "=", "success"),
        ("llm_requests_total", "model", "=~", "gpt.*"),
    ]


def test_metric_name_extraction_ignores_functions_labels_and_durations() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(llm_latency_seconds_bucket{model=~"a"}'
        "[5m] offset 1h))) > on() group_left() max(asa:threshold) or vector(1e3)"
    )
    assert metric_names(expr) == {"llm_latency_seconds_bucket", "asa:threshold"}
