"""The two ways the quick start's stack reaches the backend, which stays on 127.0.0.1:8000.

* Docker Desktop: ``docker-compose.observability.yml`` alone; containers reach the host's
  loopback as ``host.docker.internal`` (``prometheus.yml``).
* Linux: that file plus ``docker-compose.observability.linux.yml``: Prometheus and Grafana join
  the host's network and listen on 127.0.0.1; Prometheus reads ``prometheus.host.yml``.

The addresses the files imply are checked against each other and against what the quick start
says; ``docker-compose config`` checks both variants as Compose reads them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support.observability import (
    COMPOSE_YML,
    DATASOURCES_YML,
    PROMETHEUS_YML,
    REPO_ROOT,
    load_yaml,
    require_tool,
)

LINUX_YML = REPO_ROOT / "docker-compose.observability.linux.yml"
HOST_PROMETHEUS_YML = REPO_ROOT / "observability" / "prometheus" / "prometheus.host.yml"
ALERTS_YML = REPO_ROOT / "observability" / "prometheus" / "alerts.yml"
QUICKSTART_MD = REPO_ROOT / "QUICKSTART_OBSERVABILITY.md"
MAKEFILE = REPO_ROOT / "Makefile"
VARIANTS = {"desktop": [COMPOSE_YML], "linux": [COMPOSE_YML, LINUX_YML]}


def _merged(variant: str) -> dict[str, Any]:
    """The stack as ``docker-compose config`` prints it (Compose merges the files)."""
    docker_compose = require_tool("docker-compose")
    files = [arg for path in VARIANTS[variant] for arg in ("-f", path.name)]
    result = subprocess.run(
        [docker_compose, *files, "config"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    merged: dict[str, Any] = yaml.safe_load(result.stdout)
    return merged


def _backend_address() -> str:
    """Where ``make run`` serves: the Makefile's HOST and PORT defaults."""
    text = MAKEFILE.read_text()
    host = re.search(r"^HOST \?= (\S+)", text, re.MULTILINE)
    port = re.search(r"^PORT \?= (\S+)", text, re.MULTILINE)
    assert host and port
    return f"{host.group(1)}:{port.group(1)}"


def _targets(config: Path, job: str) -> list[str]:
    (scrape,) = [j for j in load_yaml(config)["scrape_configs"] if j["job_name"] == job]
    return [t for static in scrape["static_configs"] for t in static["targets"]]


def _flag(command: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
    return value


def _datasource_hosts() -> dict[str, int]:
    hosts = {}
    for datasource in load_yaml(DATASOURCES_YML)["datasources"]:
        match = re.fullmatch(r"http://([a-z]+):(\d+)", datasource["url"])
        assert match, datasource["url"]
        hosts[match.group(1)] = int(match.group(2))
    return hosts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_docker_compose_accepts_the_variant(variant: str) -> None:
    assert set(_merged(variant)["services"]) == {"jaeger", "prometheus", "grafana", "postgres"}


def test_make_run_stays_on_loopback() -> None:
    assert _backend_address() == "127.0.0.1:8000"


def test_linux_prometheus_scrapes_the_backend_where_make_run_serves_it() -> None:
    prometheus = _merged("linux")["services"]["prometheus"]
    assert prometheus["network_mode"] == "host"
    config = PurePosixPath(_flag(prometheus["command"], "config.file"))
    mounted = PurePosixPath("/etc/prometheus/observability/prometheus")
    assert config.parent == mounted  # the repository's observability/prometheus, read-only
    assert REPO_ROOT / "observability" / "prometheus" / config.name == HOST_PROMETHEUS_YML
    assert _targets(HOST_PROMETHEUS_YML, "asa-backend") == [_backend_address()]
    assert _flag(prometheus["command"], "web.listen-address") == "127.0.0.1:9090"


def test_linux_grafana_listens_on_loopback_and_finds_its_datasources_there() -> None:
    grafana = _merged("linux")["services"]["grafana"]
    assert grafana["network_mode"] == "host"
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    extra_hosts = grafana["extra_hosts"]
    if isinstance(extra_hosts, dict):  # Compose v2 prints a mapping, v1 a list
        extra_hosts = [f"{name}:{address}" for name, address in extra_hosts.items()]
    for host in _datasource_hosts():
        assert f"{host}:127.0.0.1" in extra_hosts, host


def test_linux_datasources_reach_what_the_stack_serves_on_loopback() -> None:
    services = _merged("linux")["services"]
    listening = {"prometheus": _flag(services["prometheus"]["command"], "web.listen-address")}
    for entry in services["jaeger"]["ports"]:
        if isinstance(entry, dict):  # Compose v2's long form
            published = f"{entry['host_ip']}:{entry['published']}"
            listening[f"jaeger:{entry['target']}"] = published
        else:  # Compose v1: "127.0.0.1:16686:16686/tcp"
            host_ip, host_port, container_port = str(entry).split("/")[0].split(":")
            listening[f"jaeger:{container_port}"] = f"{host_ip}:{host_port}"
    hosts = _datasource_hosts()
    assert listening["prometheus"] == f"127.0.0.1:{hosts['prometheus']}"
    assert listening[f"jaeger:{hosts['jaeger']}"] == f"127.0.0.1:{hosts['jaeger']}"


def test_desktop_prometheus_scrapes_the_backend_through_the_docker_host() -> None:
    prometheus = _merged("desktop")["services"]["prometheus"]
    assert "network_mode" not in prometheus
    port = _backend_address().split(":")[1]
    assert _targets(PROMETHEUS_YML, "asa-backend") == [f"host.docker.internal:{port}"]


def test_both_configurations_differ_only_in_the_backend_address() -> None:
    desktop, host = load_yaml(PROMETHEUS_YML), load_yaml(HOST_PROMETHEUS_YML)
    assert desktop["global"] == host["global"]
    assert [(PROMETHEUS_YML.parent / r).resolve() for r in desktop["rule_files"]] == [ALERTS_YML]
    assert [(HOST_PROMETHEUS_YML.parent / r).resolve() for r in host["rule_files"]] == [ALERTS_YML]
    assert [j["job_name"] for j in desktop["scrape_configs"]] == [
        j["job_name"] for j in host["scrape_configs"]
    ]


def test_promtool_accepts_the_host_config_and_finds_the_rules_file() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", HOST_PROMETHEUS_YML.name],
        cwd=HOST_PROMETHEUS_YML.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_quickstart_writes_down_both_platforms_and_never_opens_the_api_by_default() -> None:
    text = QUICKSTART_MD.read_text()
    linux = f"docker-compose -f {COMPOSE_YML.name} -f {LINUX_YML.name} up -d"
    desktop = f"docker-compose -f {COMPOSE_YML.name} up -d"
    assert linux in text and desktop in text
    runnable = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.DOTALL))
    assert "0.0.0.0" not in runnable
    assert "--config.file=observability/prometheus/prometheus.host.yml" in runnable
