"""Budgets as the console shows them (limit, spent, reserved, remaining of one scope), the
budgets page of an administrator, and the override form's rules.

Reads and changes go through ``app.budgets.limits``, the service ``/api/v1/limits`` calls:
``scope_status`` and ``user_status`` for where a scope stands, ``set_override`` and
``remove_override`` for an administrator's change (the API's ``LimitOverrideIn`` validates it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.access.principal import Principal
from app.budgets import limits as budget_limits
from app.budgets.guard import default_limits
from app.budgets.limits import ScopeStatus
from app.budgets.store import OverrideRow
from app.core.config import Settings
from app.core.errors import InvalidInput
from app.core.money import pico_to_usd
from app.models import USER_ID_PATTERN, BudgetScope
from app.schemas.limits import LimitOverrideIn

MAX_OVERRIDES_SHOWN = 200
SCOPE_LABELS = {
    BudgetScope.GLOBAL_DAILY: "Everyone, per UTC day",
    BudgetScope.USER_DAILY: "A user, per UTC day",
    BudgetScope.USER_MONTHLY: "A user, per UTC month",
    BudgetScope.TASK: "A task, over its whole life",
}


@dataclass(frozen=True, slots=True)
class Budget:
    label: str
    status: ScopeStatus

    @property
    def limit_usd(self) -> Decimal | None:
        limit = self.status.limit.limit_pico
        return None if limit is None else pico_to_usd(limit)

    @property
    def spent_usd(self) -> Decimal:
        return pico_to_usd(self.status.spent_pico)

    @property
    def reserved_usd(self) -> Decimal:
        return pico_to_usd(self.status.reserved_pico)

    @property
    def remaining_usd(self) -> Decimal | None:
        remaining = self.status.remaining_pico
        return None if remaining is None else pico_to_usd(remaining)

    @property
    def used_share(self) -> float | None:
        """Spent and reserved, as a share of the limit (None: unlimited)."""
        limit = self.status.limit.limit_pico
        if limit is None:
            return None
        if limit == 0:
            return 1.0
        return (self.status.spent_pico + self.status.reserved_pico) / limit

    @property
    def over_soft_threshold(self) -> bool:
        share = self.used_share
        return share is not None and share >= float(self.status.limit.soft_threshold)


@dataclass(frozen=True, slots=True)
class Default:
    scope: BudgetScope
    label: str
    limit_usd: Decimal | None


@dataclass
class BudgetsPage:
    mine: list[Budget]
    global_daily: Budget | None
    defaults: list[Default]
    overrides: Sequence[OverrideRow]
    looked_up: list[Budget]
    looked_up_user: str | None

    @staticmethod
    def override_usd(row: OverrideRow) -> Decimal | None:
        return None if row.limit_pico is None else pico_to_usd(row.limit_pico)


def build_budgets_page(
    session: Session, settings: Settings, principal: Principal, lookup_user: str | None
) -> BudgetsPage:
    daily, monthly = budget_limits.user_status(session, settings, principal.user_id)
    page = BudgetsPage(
        mine=[
            Budget("Your spend today (UTC)", daily),
            Budget("Your spend this month (UTC)", monthly),
        ],
        global_daily=None,
        defaults=[],
        overrides=[],
        looked_up=[],
        looked_up_user=None,
    )
    if not principal.is_admin:
        return page
    page.global_daily = Budget(
        "Everyone, today (UTC)",
        budget_limits.scope_status(session, settings, BudgetScope.GLOBAL_DAILY, ""),
    )
    page.defaults = [
        Default(
            scope,
            SCOPE_LABELS[scope],
            None if limit.limit_pico is None else pico_to_usd(limit.limit_pico),
        )
        for scope, limit in default_limits(settings).items()
    ]
    page.overrides = budget_limits.list_overrides(
        session, None, limit=MAX_OVERRIDES_SHOWN, offset=0
    )
    if lookup_user:
        _check_subject(BudgetScope.USER_DAILY, lookup_user)
        day, month = budget_limits.user_status(session, settings, lookup_user)
        page.looked_up = [
            Budget(f"{lookup_user}, today (UTC)", day),
            Budget(f"{lookup_user}, this month (UTC)", month),
        ]
        page.looked_up_user = lookup_user
    return page


@dataclass(frozen=True, slots=True)
class OverrideChange:
    action: str  # "set" or "remove"
    scope: BudgetScope
    subject_id: str  # '' for the global scope
    limit: LimitOverrideIn | None


def parse_override_form(form: dict[str, str]) -> OverrideChange:
    """The override form: scope, subject, and either a limit in USD, "unlimited", or remove."""
    try:
        scope = BudgetScope(form.get("scope", ""))
    except ValueError as exc:
        raise InvalidInput("Choose a scope.", field="scope") from exc
    subject = "" if scope is BudgetScope.GLOBAL_DAILY else form.get("subject_id", "").strip()
    _check_subject(scope, subject)
    action = form.get("action", "set")
    if action == "remove":
        return OverrideChange("remove", scope, subject, None)
    if action != "set":
        raise InvalidInput("Unknown action.", field="action")
    raw_limit = form.get("limit_usd", "").strip()
    unlimited = form.get("unlimited") == "on"
    if not raw_limit and not unlimited:
        raise InvalidInput("Enter a limit in USD, or tick 'unlimited'.", field="limit_usd")
    try:
        body = LimitOverrideIn.model_validate(
            {
                "limit_usd": None if unlimited else raw_limit,
                "soft_threshold": form.get("soft_threshold", "").strip() or None,
            }
        )
    except ValidationError as exc:
        fields = ", ".join(str(e["loc"][-1]) for e in exc.errors())
        raise InvalidInput(
            f"Not a valid value: {fields} (USD with at most 12 decimals, up to 1,000,000; "
            "threshold above 0, at most 1).",
            field=fields,
        ) from exc
    return OverrideChange("set", scope, subject, body)


def _check_subject(scope: BudgetScope, subject: str) -> None:
    if scope is BudgetScope.GLOBAL_DAILY:
        return
    if not re.fullmatch(USER_ID_PATTERN, subject):
        what = "task id" if scope is BudgetScope.TASK else "user id"
        raise InvalidInput(
            f"Enter a {what}: 1-64 letters, digits and . _ : @ - (not first).", field="subject_id"
        )


def apply_override(
    session: Session, settings: Settings, principal: Principal, change: OverrideChange
) -> None:
    """Set or remove the override, as ``PUT``/``DELETE /api/v1/limits/...`` do."""
    if change.action == "remove":
        budget_limits.remove_override(session, change.scope, change.subject_id)
        return
    assert change.limit is not None
    budget_limits.set_override(
        session,
        settings,
        change.scope,
        change.subject_id,
        limit_usd=change.limit.limit_usd,
        soft_threshold=change.limit.soft_threshold,
        updated_by=principal.user_id,
    )
