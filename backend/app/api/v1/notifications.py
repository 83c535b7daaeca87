"""``/api/v1/notifications``: channels, subscriptions, the test send and dead letters.

Administrators manage channels and dead letters and every subscription; a user lists the
channels open to them and manages the subscriptions of their own events. Rules:
``app.notifications.service``; delivery: ``app.notifications.dispatcher``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from app.api.auth import AdminPrincipal, CurrentPrincipal
from app.api.deps import ID_DESCRIPTION, ID_PATTERN, RuntimeDep, SessionDep
from app.notifications import service
from app.schemas.errors import ErrorBody
from app.schemas.notifications import (
    ChannelCreate,
    ChannelCreated,
    ChannelList,
    ChannelOut,
    ChannelUpdate,
    DeadLetterList,
    DeliveryOut,
    SubscriptionCreate,
    SubscriptionList,
    SubscriptionOut,
    TestResult,
)

router = APIRouter(prefix="/api/v1/notifications", tags=["notifications"])

RowId = Annotated[
    str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]{1,32}$", description="A hex id.")
]
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "A channel of that name, or that subscription, exists"}
}


@router.post("/channels", response_model=ChannelCreated, status_code=201, responses=_CONFLICT)
def create_channel(
    body: ChannelCreate, session: SessionDep, admin: AdminPrincipal
) -> ChannelCreated:
    """A channel; a webhook's signing secret is in this answer and never again."""
    return service.create_channel(session, admin, body)


@router.get("/channels", response_model=ChannelList)
def list_channels(session: SessionDep, principal: CurrentPrincipal) -> ChannelList:
    """Every channel (administrators); the channels open to users (a user)."""
    return service.list_channels(session, principal)


@router.get("/channels/{channel_id}", response_model=ChannelOut)
def get_channel(channel_id: RowId, session: SessionDep, principal: CurrentPrincipal) -> ChannelOut:
    return service.get_channel(session, principal, channel_id)


@router.patch("/channels/{channel_id}", response_model=ChannelOut, responses=_CONFLICT)
def update_channel(
    channel_id: RowId, body: ChannelUpdate, session: SessionDep, admin: AdminPrincipal
) -> ChannelOut:
    """Rename, enable or disable a channel (a disabled channel's deliveries wait for it)."""
    return service.update_channel(session, admin, channel_id, body)


@router.delete("/channels/{channel_id}", status_code=204, response_class=Response)
def delete_channel(channel_id: RowId, session: SessionDep, admin: AdminPrincipal) -> Response:
    """The channel with its subscriptions and deliveries."""
    service.delete_channel(session, admin, channel_id)
    return Response(status_code=204)


@router.post("/channels/{channel_id}/test", response_model=TestResult)
def test_channel(
    channel_id: RowId, session: SessionDep, runtime: RuntimeDep, admin: AdminPrincipal
) -> TestResult:
    """Send a test event over the channel now; the answer says whether the receiver took it."""
    return service.send_test(session, runtime.settings, admin, channel_id)


@router.get("/subscriptions", response_model=SubscriptionList)
def list_subscriptions(
    session: SessionDep,
    principal: CurrentPrincipal,
    user_id: Annotated[
        str | None, Query(max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
    ] = None,
) -> SubscriptionList:
    """Your subscriptions; an administrator's: everyone's, or one user's."""
    return service.list_subscriptions(session, principal, user_id)


@router.post("/subscriptions", response_model=SubscriptionOut, status_code=201, responses=_CONFLICT)
def create_subscription(
    body: SubscriptionCreate, session: SessionDep, principal: CurrentPrincipal
) -> SubscriptionOut:
    """Subscribe a channel to one kind of event (or ``*``) of yours; administrators may
    subscribe to another user's events or to everyone's (``all_users``)."""
    return service.create_subscription(session, principal, body)


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut)
def get_subscription(
    subscription_id: RowId, session: SessionDep, principal: CurrentPrincipal
) -> SubscriptionOut:
    return service.get_subscription(session, principal, subscription_id)


@router.delete("/subscriptions/{subscription_id}", status_code=204, response_class=Response)
def delete_subscription(
    subscription_id: RowId, session: SessionDep, principal: CurrentPrincipal
) -> Response:
    service.delete_subscription(session, principal, subscription_id)
    return Response(status_code=204)


@router.get("/dead-letters", response_model=DeadLetterList)
def list_dead_letters(
    session: SessionDep,
    _admin: AdminPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> DeadLetterList:
    """Deliveries that failed every try, newest first."""
    return service.list_dead_letters(session, limit, offset)


@router.post("/dead-letters/{delivery_id}/retry", response_model=DeliveryOut)
def retry_dead_letter(
    delivery_id: RowId, session: SessionDep, _admin: AdminPrincipal
) -> DeliveryOut:
    """Deliver a dead letter again, with a fresh count of tries."""
    return service.retry_dead_letter(session, delivery_id)
