"""OBSERVABILITY.md and QUICKSTART_OBSERVABILITY.md keep the seed's promises and match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import Settings
from tests.support.observability import (
    COMPOSE_YML,
    METRICS,
    OBSERVABILITY_MD,
    QUICKSTART_MD,
    REPO_ROOT,
    SPAN_ATTRIBUTES,
    doc_queries,
    documented_span_attributes,
    load_yaml,
)

SEED_PROMQL = [
    "sum(llm_cost_usd_total)",
    "rate(llm_requests_total[1m])",
    "histogram_quantile(0.95, rate(llm_latency_seconds_bucket[5m]))",
    'rate(llm_requests_total{status="success"}[5m]) / rate(llm_requests_total[5m])',
]
ENV_VARS = [
    "DATABASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ENABLE_OPENTELEMETRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
]
SEED_COMMANDS = [
    "docker-compose -f docker-compose.observability.yml up -d",
    "cp .env.example",
    "cd backend && uvicorn app.main:app --reload",
    "curl -X POST http://localhost:8000/api/v1/task/submit "
    '-H "Content-Type: application/json" '
    """-d '{"repo_url": "https://github.com/example/repo", "bug_description": "Fix bug", """
    """"test_command": "pytest"}'""",
    "curl http://localhost:8000/api/v1/usage/task/{task_id}",
    "curl http://localhost:8000/metrics",
]


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """First cell (without backticks) -> all cells, for every table row of a document."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def _bash_commands(markdown: str) -> list[str]:
    """Commands of the ```bash fences, with backslash continuations joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands.extend(line.strip() for line in joined.splitlines() if line.strip())
    return commands


@pytest.mark.parametrize("path", [OBSERVABILITY_MD, QUICKSTART_MD], ids=lambda p: p.name)
def test_seed_promql_examples_are_kept_verbatim(path: Path) -> None:
    exprs = [query.expr for query in doc_queries(path)]
    for example in SEED_PROMQL:
        assert example in exprs


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_metric_is_documented_with_its_type_and_labels(metric: str) -> None:
    kind, labels = METRICS[metric]
    row = _table_rows(OBSERVABILITY_MD.read_text())[metric]
    assert row[1] == kind
    documented = set(re.findall(r"`(\w+)`", row[2]))
    assert documented == labels


def test_metrics_tables_list_only_contract_metrics() -> None:
    rows = _table_rows(OBSERVABILITY_MD.read_text())
    documented = {
        name
        for name, cells in rows.items()
        if cells[1:2] in (["counter"], ["gauge"], ["histogram"])
    }
    assert documented == set(METRICS)


def test_cardinality_policy_rules_out_id_labels() -> None:
    text = OBSERVABILITY_MD.read_text()
    assert "### Cardinality policy" in text
    assert "No `task_id` or `user_id` labels" in text
    assert 'model="other"' in text
    for _kind, labels in METRICS.values():
        assert not labels & {"task_id", "user_id", "request_id", "trace_id"}


@pytest.mark.parametrize("attribute", SPAN_ATTRIBUTES)
def test_span_attribute_is_documented(attribute: str) -> None:
    assert attribute in documented_span_attributes()


def test_span_name_and_kind_are_documented() -> None:
    text = OBSERVABILITY_MD.read_text()
    assert "`chat {model}`" in text
    assert "`CLIENT`" in text


@pytest.mark.parametrize("variable", ENV_VARS)
def test_env_var_is_documented(variable: str) -> None:
    assert variable in _table_rows(OBSERVABILITY_MD.read_text())


def test_documented_backend_env_vars_are_settings_fields() -> None:
    rows = _table_rows(OBSERVABILITY_MD.read_text())
    section = OBSERVABILITY_MD.read_text().split("## Configuration")[1].split("The compose file")[0]
    backend_vars = [name for name in rows if f"| `{name}` |" in section]
    assert set(ENV_VARS) <= set(backend_vars)
    for name in backend_vars:
        assert name.lower() in Settings.model_fields, name


def test_documented_compose_variables_are_used_by_the_compose_file() -> None:
    compose_text = COMPOSE_YML.read_text()
    section = OBSERVABILITY_MD.read_text().split("The compose file reads these")[1].split("##")[0]
    names = re.findall(r"`([A-Z][A-Z_]+)`", section)
    assert names
    for name in names:
        assert "${" + name + ":-" in compose_text, name


def test_retention_is_documented_and_matches_the_compose_defaults() -> None:
    text = OBSERVABILITY_MD.read_text()
    assert "## Retention" in text
    prometheus = load_yaml(COMPOSE_YML)["services"]["prometheus"]["command"]
    assert "--storage.tsdb.retention.time=${PROMETHEUS_RETENTION:-15d}" in prometheus
    assert "15 days" in text


def test_cost_threshold_instructions_name_the_recording_rule_and_reload() -> None:
    text = OBSERVABILITY_MD.read_text()
    assert "asa:llm_cost_burn_threshold_usd_per_hour" in text
    assert "curl -X POST http://localhost:9090/-/reload" in _bash_commands(text)


def test_quickstart_has_the_seven_steps_in_order() -> None:
    steps = re.findall(r"^## (\d)\. ", QUICKSTART_MD.read_text(), flags=re.MULTILINE)
    assert steps == [str(n) for n in range(1, 8)]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_quickstart_keeps_the_seed_command(command: str) -> None:
    commands = _bash_commands(QUICKSTART_MD.read_text())
    assert any(command in " ".join(line.split()) for line in commands), command


def test_quickstart_make_targets_and_variables_exist() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.MULTILINE))
    for command in _bash_commands(QUICKSTART_MD.read_text()):
        if not command.startswith("make "):
            continue
        target, *assignments = command.split()[1:]
        assert target in targets, command
        for assignment in assignments:
            assert re.search(rf"^{assignment.split('=')[0]} \?=", makefile, re.MULTILINE), command


@pytest.mark.parametrize("path", [OBSERVABILITY_MD, QUICKSTART_MD], ids=lambda p: p.name)
def test_docker_compose_commands_name_the_stack_file(path: Path) -> None:
    text = path.read_text()
    for command in _bash_commands(text):
        if command.startswith("docker-compose"):
            assert command.startswith(f"docker-compose -f {COMPOSE_YML.name} "), command


def test_stack_files_named_in_the_docs_exist() -> None:
    text = OBSERVABILITY_MD.read_text()
    named = set(
        re.findall(r"`((?:observability/|prometheus\.yml|docker-compose\.)[\w./-]*)`", text)
    )
    assert named
    for relative in named:
        assert (REPO_ROOT / relative).exists(), relative


def test_env_example_has_the_variables_the_quickstart_sets() -> None:
    env_example = REPO_ROOT / ".env.example"
    if not env_example.exists():
        if os.environ.get("ASA_REQUIRE_POSTGRES") == "1":
            pytest.fail("QUICKSTART_OBSERVABILITY.md step 3 copies .env.example, which is missing")
        pytest.skip(".env.example not written yet")
    step_3 = QUICKSTART_MD.read_text().split("## 3.")[1].split("## 4.")[0]
    variables = set(re.findall(r"`([A-Z][A-Z0-9_]+)=", step_3))
    assert variables >= {"OPENAI_API_KEY", "ENABLE_OPENTELEMETRY", "DATABASE_URL"}
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", env_example.read_text(), re.MULTILINE))
    assert variables <= listed


def test_python_modules_the_docs_run_exist_and_take_the_documented_options() -> None:
    commands = _bash_commands(OBSERVABILITY_MD.read_text() + QUICKSTART_MD.read_text())
    invocations = [
        (match.group(1), re.findall(r"(--[a-z][\w-]*)", match.group(2)))
        for command in commands
        if (match := re.search(r"python -m (app[\w.]*)(.*)", command))
    ]
    assert invocations
    for module, options in invocations:
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO_ROOT / "backend",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{module}: {result.stderr}"
        for option in options:
            assert option in result.stdout, (module, option)
