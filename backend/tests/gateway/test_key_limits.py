"""A key's own limits: its model allow-list and its budget (the ``key`` budget scope), set
through the admin API and the CLI, enforced by the gateway before anything is sent."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest
from sqlalchemy import func, select

from app import cli
from app.models import BudgetReservation
from tests.gateway.conftest import LiveService, post, unique

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "count to three"}],
    "max_tokens": 20,
}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _admin(service: LiveService) -> str:
    return service.new_key(unique("admin"), role="admin")[1]


def _create(service: LiveService, admin: str, **body: object) -> dict[str, object]:
    answer = httpx.post(
        f"{service.url}/api/v1/admin/keys",
        json={"user_id": unique("u"), **body},
        headers=_auth(admin),
    )
    assert answer.status_code == 201, answer.text
    created: dict[str, object] = answer.json()
    return created


def test_a_model_outside_the_keys_allow_list_is_refused_before_it_is_sent(
    service: LiveService,
) -> None:
    created = _create(service, _admin(service), allowed_models=["gpt-4o"])
    assert created["allowed_models"] == ["gpt-4o"]
    key = str(created["key"])
    before = service.sim_requests()
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert caught.value.code == "model_not_allowed"
    assert service.sim_requests() == before
    assert client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})  # type: ignore[call-overload]
    assert [m.id for m in client.models.list()] == ["gpt-4o"]


def test_the_allow_list_changes_with_patch(service: LiveService) -> None:
    admin = _admin(service)
    created = _create(service, admin, allowed_models=["gpt-4o"])
    patched = httpx.patch(
        f"{service.url}/api/v1/admin/keys/{created['id']}",
        json={"allowed_models": None},
        headers=_auth(admin),
    )
    assert patched.status_code == 200 and patched.json()["allowed_models"] is None
    service.gateway.callers._limits.clear()  # else the change lands within a second
    answer = post(service, "/chat/completions", CHAT, headers=_auth(str(created["key"])))
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"allowed_models": "gpt-4o"},
        {"allowed_models": [""]},
        {"allowed_models": ["x" * 201]},
        {"allowed_models": ["ok"] * 101},
        {"budget_usd": "-1"},
        {"budget_usd": "NaN"},
    ],
)
def test_hostile_key_limits_are_a_422(service: LiveService, body: dict[str, object]) -> None:
    answer = httpx.post(
        f"{service.url}/api/v1/admin/keys",
        json={"user_id": unique("u"), **body},
        headers=_auth(_admin(service)),
    )
    assert answer.status_code == 422, answer.text


def test_a_keys_budget_stops_its_calls_before_the_upstream_and_holds_its_cap(
    service: LiveService,
) -> None:
    cap = Decimal("0.00005")
    created = _create(service, _admin(service), budget_usd=str(cap))
    assert Decimal(str(created["budget_usd"])) == cap
    key, user = str(created["key"]), str(created["user_id"])
    client = openai.OpenAI(base_url=service.base_url, api_key=key, max_retries=0)
    # Its writer process up (it takes the gateway's reservations, the key's counter included).
    writer = service.app.state.runtime.db_worker.process
    assert writer is not None and writer.start(wait=60)
    answered = 0
    before = service.sim_requests()
    refusal: dict[str, object] | None = None
    status = 0
    for _ in range(40):
        raw = client.chat.completions.with_raw_response
        try:
            reply = raw.create(**CHAT)  # type: ignore[call-overload]
        except openai.APIStatusError as exc:
            status, refusal = exc.status_code, exc.body  # type: ignore[assignment]
            break
        answered += 1
        assert reply.headers["x-asa-budget-scope"] == "key"
    assert refusal is not None, "the budget never stopped the key"
    assert status == 402
    assert refusal["scope"] == "key" and refusal["code"] == "budget_exceeded"
    assert refusal["subject_id"] == created["id"]
    assert answered >= 1
    assert service.sim_requests() == before + answered  # the refused call was not sent
    rows = service.rows(user_id=user)
    spent = sum((r.cost_usd for r in rows if r.status == "success"), Decimal(0))
    assert 0 < spent <= cap
    assert [r.status for r in rows][-1] == "blocked"
    with service.engine.connect() as conn:
        open_reservations = conn.scalar(
            select(func.count())
            .select_from(BudgetReservation)
            .where(BudgetReservation.key_id == created["id"])
        )
    assert open_reservations == 0
    assert writer.answered >= answered + 1  # every call asked the writer process first
    listed = httpx.get(f"{service.url}/api/v1/admin/keys", headers=_auth(_admin(service))).json()
    (view,) = [k for k in listed["items"] if k["id"] == created["id"]]
    assert Decimal(view["budget_spent_usd"]) == spent


def test_the_cli_issues_a_key_with_limits_and_changes_them(
    service: LiveService, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = service.settings

    made = cli.run(
        ["keys", "create", "--user", unique("cli"), "--json",
         "--allow-model", "gpt-4o-mini", "--allow-model", "gpt-4o", "--budget-usd", "0.5"],
        settings,
    )  # fmt: skip
    assert made == 0
    row = json.loads(capsys.readouterr().out)
    assert row["allowed_models"] == "gpt-4o-mini,gpt-4o"
    assert cli.run(["keys", "limit", row["id"], "--any-model", "--budget-usd", "2"], settings) == 0
    said = capsys.readouterr().err
    assert "models: any" in said and "budget: $2" in said
    with pytest.raises(SystemExit):
        cli.run(["keys", "limit", row["id"], "--budget-usd", "-3"], settings)
    assert cli.run(["keys", "limit", row["id"]], settings) == 1  # nothing to change
    listed = httpx.get(f"{service.url}/api/v1/admin/keys", headers=_auth(_admin(service))).json()
    (view,) = [k for k in listed["items"] if k["id"] == row["id"]]
    assert view["allowed_models"] is None
    assert Decimal(view["budget_usd"]) == 2
