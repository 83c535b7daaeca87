"""Grafana provisioning and the ASA dashboard: cross-checked against each other and the contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.observability import (
    DATASOURCES_YML,
    dashboard_queries,
    exposed_series_names,
    iter_panels,
    load_dashboard,
    load_yaml,
    metric_names,
    recording_rule_names,
)

GRAFANA_BUILTIN_UIDS = {"-- Grafana --", "grafana"}


def _datasources() -> dict[str, dict[str, Any]]:
    return {ds["uid"]: ds for ds in load_yaml(DATASOURCES_YML)["datasources"]}


def _uid_of(kind: str) -> str:
    (uid,) = [uid for uid, ds in _datasources().items() if ds["type"] == kind]
    return uid


def _datasource_refs(node: Any) -> Iterator[Any]:
    """Every value of a "datasource" key anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def _exprs_of(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel.get("targets", []) if "expr" in target]


def _panels_using(series: str) -> list[dict[str, Any]]:
    return [
        panel
        for panel in iter_panels(load_dashboard())
        if any(series in metric_names(expr) for expr in _exprs_of(panel))
    ]


def test_prometheus_and_jaeger_are_provisioned_with_fixed_uids() -> None:
    datasources = _datasources()
    assert {ds["type"] for ds in datasources.values()} == {"prometheus", "jaeger"}
    assert all(uid.startswith("asa-") for uid in datasources)
    assert datasources[_uid_of("prometheus")]["isDefault"] is True


def test_prometheus_exemplars_open_traces_in_the_jaeger_datasource() -> None:
    prometheus = _datasources()[_uid_of("prometheus")]
    (destination,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {"name": "trace_id", "datasourceUid": _uid_of("jaeger")}


def test_every_datasource_the_dashboard_names_is_provisioned_by_uid() -> None:
    provisioned = set(_datasources())
    refs = list(_datasource_refs(load_dashboard()))
    assert refs
    for ref in refs:
        assert isinstance(ref, dict), f"datasource referenced by name, not uid: {ref!r}"
        assert ref["uid"] in provisioned | GRAFANA_BUILTIN_UIDS, ref
        if ref["uid"] in provisioned:
            assert ref["type"] == _datasources()[ref["uid"]]["type"], ref


def test_every_panel_and_target_has_an_explicit_datasource() -> None:
    for panel in iter_panels(load_dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in _datasources(), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == panel["datasource"]["uid"], panel["title"]


def test_panel_queries_select_only_contract_metrics() -> None:
    allowed = exposed_series_names() | recording_rule_names()
    for query in dashboard_queries():
        names = metric_names(query.expr)
        assert names, query.source
        assert names <= allowed, query.source


@pytest.mark.parametrize(
    "series",
    [
        "llm_cost_usd_total",
        "llm_tokens_total",
        "llm_requests_total",
        "llm_latency_seconds_bucket",
        "task_duration_seconds_bucket",
        "task_success_total",
        "active_tasks",
        "llm_budget_blocked_total",
        "llm_budget_soft_limit_total",
        "llm_unpriced_calls_total",
        "llm_usage_spool_pending",
    ],
)
def test_dashboard_charts_metric(series: str) -> None:
    assert _panels_using(series)


def test_cost_is_shown_over_time_and_by_model() -> None:
    exprs = [expr for panel in _panels_using("llm_cost_usd_total") for expr in _exprs_of(panel)]
    assert any("rate(llm_cost_usd_total" in expr and "by (model)" in expr for expr in exprs)
    assert any("increase(llm_cost_usd_total" in expr and "by (model)" in expr for expr in exprs)


def test_tokens_are_split_by_type() -> None:
    exprs = [expr for panel in _panels_using("llm_tokens_total") for expr in _exprs_of(panel)]
    assert any("by (token_type)" in expr for expr in exprs)


def test_requests_per_second_and_error_ratio_are_shown() -> None:
    exprs = [expr for panel in _panels_using("llm_requests_total") for expr in _exprs_of(panel)]
    assert any("rate(llm_requests_total" in expr and "by (status)" in expr for expr in exprs)
    assert any('status="error"' in expr and " / " in expr for expr in exprs)


def test_latency_panels_show_p50_and_p95_and_request_exemplars() -> None:
    panels = _panels_using("llm_latency_seconds_bucket")
    exprs = [expr for panel in panels for expr in _exprs_of(panel)]
    assert any(expr.startswith("histogram_quantile(0.5,") for expr in exprs)
    assert any(expr.startswith("histogram_quantile(0.95,") for expr in exprs)
    for panel in panels:
        assert all(target.get("exemplar") is True for target in panel["targets"]), panel["title"]


def test_task_durations_are_shown_as_quantiles() -> None:
    exprs = [
        expr for panel in _panels_using("task_duration_seconds_bucket") for expr in _exprs_of(panel)
    ]
    assert any(expr.startswith("histogram_quantile(0.95,") for expr in exprs)


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in iter_panels(load_dashboard())]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(load_dashboard()):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_has_a_stable_uid_and_is_read_only() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "asa-llm-overview"
    assert dashboard["editable"] is False
    assert "id" not in dashboard or dashboard["id"] is None


def test_template_variables_list_values_of_contract_labels() -> None:
    variables = {var["name"]: var for var in load_dashboard()["templating"]["list"]}
    assert set(variables) == {"model", "agent"}
    for name, var in variables.items():
        assert var["query"]["query"] == f"label_values(llm_requests_total, {name})"
        assert var["allValue"] == ".*"
