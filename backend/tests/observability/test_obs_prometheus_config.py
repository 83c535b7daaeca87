"""prometheus.yml and the alert rules, checked by promtool and against the metrics contract."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.observability import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    PROMETHEUS_YML,
    REPO_ROOT,
    exposed_series_names,
    load_yaml,
    metric_names,
    recording_rule_names,
    require_tool,
    rule_queries,
)

BACKEND_JOB = "asa-backend"
REQUIRED_ALERTS = {
    "LLMCostBurnRateHigh",
    "LLMErrorRatioHigh",
    "LLMLatencyP95High",
    "LLMUnpricedModelCalls",
    "LLMBudgetBlocks",
    "ASABackendDown",
}


def _promtool(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _backend_scrape_config() -> dict[str, Any]:
    (job,) = [
        job for job in load_yaml(PROMETHEUS_YML)["scrape_configs"] if job["job_name"] == BACKEND_JOB
    ]
    return job


def test_promtool_accepts_the_config_and_finds_the_rules_file() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", ALERTS_TEST_YML.name, cwd=ALERTS_TEST_YML.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_cover_every_alert() -> None:
    tested = {
        case["alertname"]
        for test in load_yaml(ALERTS_TEST_YML)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(_alerts()) <= tested


def test_rule_files_are_relative_to_the_config_so_they_resolve_in_the_container_too() -> None:
    for entry in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert not Path(entry).is_absolute(), entry
        assert (PROMETHEUS_YML.parent / entry).resolve() == ALERTS_YML


def test_backend_metrics_are_scraped_on_the_docker_host() -> None:
    job = _backend_scrape_config()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["host.docker.internal:8000"]


def test_every_required_alert_exists() -> None:
    assert set(_alerts()) >= REQUIRED_ALERTS


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS | {"LLMUsageSpoolBacklog"}))
def test_alert_has_severity_summary_and_description(name: str) -> None:
    alert = _alerts()[name]
    assert alert["labels"]["severity"] in {"info", "warning", "critical"}
    assert alert["annotations"]["summary"].strip()
    assert len(alert["annotations"]["description"].split()) >= 8


def test_backend_down_alert_watches_the_scrape_job_of_the_backend() -> None:
    expr = " ".join(_alerts()["ASABackendDown"]["expr"].split())
    assert expr == f'up{{job="{BACKEND_JOB}"}} == 0'


def test_cost_alert_reads_its_hourly_threshold_from_one_recording_rule() -> None:
    (threshold,) = [r for r in _rules() if r.get("record", "").startswith("asa:llm_cost_burn")]
    assert threshold["expr"].strip().startswith("vector(")
    assert threshold["record"] in metric_names(_alerts()["LLMCostBurnRateHigh"]["expr"])


def test_rules_select_only_contract_metrics() -> None:
    allowed = exposed_series_names() | recording_rule_names() | {"up"}
    for query in rule_queries():
        assert metric_names(query.expr) <= allowed, query.source
