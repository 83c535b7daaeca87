"""docker-compose.observability.yml: valid for Compose, and wired to the files it serves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.support.observability import (
    COMPOSE_YML,
    DASHBOARD_JSON,
    DASHBOARD_PROVIDERS_YML,
    DATASOURCES_YML,
    GRAFANA_DIR,
    PROMETHEUS_YML,
    REPO_ROOT,
    load_yaml,
    require_tool,
)

SERVICES = ("jaeger", "prometheus", "grafana", "postgres")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_YML)
    return data


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = _compose()["services"][name]
    return service


def _published(name: str) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port)."""
    published = {}
    for entry in _service(name).get("ports", []):
        host_ip, host_port, container_port = str(entry).split(":")
        published[int(container_port)] = (host_ip, int(host_port))
    return published


def _host_path(service: str, container_path: str) -> Path:
    """The repository file a container path of a service is bind-mounted from."""
    target = PurePosixPath(container_path)
    for volume in _service(service).get("volumes", []):
        source, destination = str(volume).split(":")[:2]
        if not source.startswith("./"):
            continue
        destination_path = PurePosixPath(destination)
        if target == destination_path or destination_path in target.parents:
            return REPO_ROOT / source / target.relative_to(destination_path)
    raise AssertionError(f"{container_path} is not bind-mounted into {service}")


def _environment(name: str) -> dict[str, str]:
    env = _service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_docker_compose_accepts_the_file() -> None:
    docker_compose = require_tool("docker-compose")
    result = subprocess.run(
        [docker_compose, "-f", COMPOSE_YML.name, "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stack_has_the_four_services() -> None:
    assert set(_compose()["services"]) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_image_is_pinned_to_a_version(name: str) -> None:
    image = _service(name)["image"]
    repository, _, tag = image.rpartition(":")
    assert repository, f"{image} has no tag"
    assert tag != "latest"
    assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9]+)?", tag), image


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_a_healthcheck(name: str) -> None:
    check = _service(name)["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert "interval" in check
    assert "retries" in check


@pytest.mark.parametrize(
    ("name", "data_dir"),
    [
        ("prometheus", "/prometheus"),
        ("grafana", "/var/lib/grafana"),
        ("postgres", "/var/lib/postgresql/data"),
    ],
)
def test_data_lives_in_a_named_volume(name: str, data_dir: str) -> None:
    named = set(_compose()["volumes"])
    mounts = dict(
        reversed(str(volume).split(":")[:2]) for volume in _service(name).get("volumes", [])
    )
    assert mounts.get(data_dir) in named


@pytest.mark.parametrize(
    ("name", "container_port", "host_port"),
    [
        ("jaeger", 16686, 16686),
        ("jaeger", 4317, 4317),
        ("prometheus", 9090, 9090),
        ("grafana", 3000, 3000),
        ("postgres", 5432, 5433),
    ],
)
def test_documented_port_is_published_on_loopback(
    name: str, container_port: int, host_port: int
) -> None:
    assert _published(name)[container_port] == ("127.0.0.1", host_port)


def test_jaeger_receives_otlp() -> None:
    assert _environment("jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"


def test_prometheus_can_reach_the_backend_on_the_host() -> None:
    assert "host.docker.internal:host-gateway" in _service("prometheus")["extra_hosts"]


def test_prometheus_container_reads_this_config_and_its_rule_files() -> None:
    command = _service("prometheus")["command"]
    (config_flag,) = [arg for arg in command if arg.startswith("--config.file=")]
    config_in_container = PurePosixPath(config_flag.split("=", 1)[1])
    assert _host_path("prometheus", str(config_in_container)).resolve() == PROMETHEUS_YML
    for entry in load_yaml(PROMETHEUS_YML)["rule_files"]:
        rules_in_container = config_in_container.parent / entry
        assert _host_path("prometheus", str(rules_in_container)).is_file(), entry


def test_prometheus_stores_exemplars_and_has_a_retention() -> None:
    command = _service("prometheus")["command"]
    assert "--enable-feature=exemplar-storage" in command
    assert any(arg.startswith("--storage.tsdb.retention.time=") for arg in command)


def test_grafana_is_provisioned_from_the_repository() -> None:
    assert _host_path("grafana", "/etc/grafana/provisioning").resolve() == (
        GRAFANA_DIR / "provisioning"
    )
    assert _host_path("grafana", "/etc/grafana/provisioning/datasources/datasources.yml") == (
        DATASOURCES_YML
    )
    (provider,) = load_yaml(DASHBOARD_PROVIDERS_YML)["providers"]
    assert provider["type"] == "file"
    dashboards_dir = _host_path("grafana", provider["options"]["path"])
    assert (dashboards_dir / DASHBOARD_JSON.name).resolve() == DASHBOARD_JSON


def test_grafana_home_dashboard_is_the_provisioned_one() -> None:
    home = _environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path("grafana", home).resolve() == DASHBOARD_JSON


def test_grafana_datasource_urls_name_compose_services() -> None:
    for datasource in load_yaml(DATASOURCES_YML)["datasources"]:
        match = re.fullmatch(r"http://([a-z]+):(\d+)", datasource["url"])
        assert match, datasource["url"]
        service, port = match.group(1), int(match.group(2))
        assert service in _compose()["services"]
        assert port in _published(service)
