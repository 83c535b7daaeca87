"""Third-party clients from PyPI, unchanged, making real calls through the gateway: the ``llm``
CLI (an OpenAI-compatible model in its extra-openai-models.yaml) and the OpenAI Agents SDK
(``openai-agents``, on the Responses API, its tracing off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import openai
from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled

from tests.gateway.conftest import LiveService, unique

LLM_CLI = Path(sys.executable).parent / "llm"


def _llm(
    service: LiveService, key: str, home: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    home.mkdir(exist_ok=True)
    (home / "extra-openai-models.yaml").write_text(
        "- model_id: asa-gateway\n"
        "  model_name: gpt-4o-mini\n"
        f'  api_base: "{service.base_url}"\n'
        "  api_key_name: asa\n"
        "  headers:\n"
        "    X-ASA-Agent: llm-cli\n",
        encoding="utf-8",
    )
    (home / "keys.json").write_text(json.dumps({"asa": key}), encoding="utf-8")
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [str(LLM_CLI), "-m", "asa-gateway", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_llm_cli_streams_and_answers_through_the_gateway(
    service: LiveService, tmp_path: Path
) -> None:
    user = unique("llm")
    _, key = service.new_key(user)
    streamed = _llm(service, key, tmp_path / "llm", "Say hello")
    assert streamed.returncode == 0, streamed.stderr
    plain = _llm(service, key, tmp_path / "llm", "--no-stream", "Say hello again")
    assert plain.returncode == 0, plain.stderr
    assert streamed.stdout.strip() and plain.stdout.strip()
    rows = service.rows(user_id=user)
    assert [(r.is_stream, r.status, r.agent) for r in rows] == [
        (True, "success", "llm-cli"),
        (False, "success", "llm-cli"),
    ]
    assert all(r.cost_pico_usd > 0 and r.model == "gpt-4o-mini" for r in rows)
    assert all("usage_missing" not in (r.flags or "") for r in rows)


def test_the_llm_cli_is_stopped_by_the_keys_budget(service: LiveService, tmp_path: Path) -> None:
    admin = service.new_key(unique("admin"), role="admin")[1]
    created = httpx.post(
        f"{service.url}/api/v1/admin/keys",
        json={"user_id": unique("llm"), "budget_usd": "0"},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()
    before = service.sim_requests()
    refused = _llm(service, created["key"], tmp_path / "llm", "Say hello")
    assert refused.returncode != 0
    assert "budget" in refused.stderr.lower()
    assert service.sim_requests() == before
    (row,) = service.rows(user_id=created["user_id"])
    assert row.status == "blocked"


def test_an_openai_agents_runner_on_the_responses_api(service: LiveService) -> None:
    set_tracing_disabled(True)
    user = unique("agents")
    _, key = service.new_key(user)
    client = openai.AsyncOpenAI(
        base_url=service.base_url,
        api_key=key,
        max_retries=0,
        default_headers={"X-ASA-Agent": "openai-agents"},
    )
    agent = Agent(
        name="Greeter",
        instructions="Greet the user in one short sentence.",
        model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client),
    )
    result = Runner.run_sync(agent, "Hello there")
    assert isinstance(result.final_output, str) and result.final_output
    (row,) = service.rows(user_id=user)
    assert (row.operation, row.status, row.agent) == ("responses", "success", "openai-agents")
    usage = result.context_wrapper.usage
    assert (row.prompt_tokens, row.completion_tokens) == (usage.input_tokens, usage.output_tokens)
    assert row.cost_usd > Decimal(0)
