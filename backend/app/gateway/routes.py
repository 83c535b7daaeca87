"""The ``/v1`` routes: the OpenAI API's paths, bodies and error shapes.

Mounted by ``app.main`` beside ``/api/v1`` (the service's own API). Every answer here, errors
included, is shaped as the OpenAI API's, so that SDKs and tools work unchanged; these routes are
not in the service's OpenAPI schema (their contract is OpenAI's; see docs/GATEWAY.md).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app.gateway.callers import Caller
from app.gateway.errors import GatewayError, error_response
from app.gateway.proxy import (
    CHAT_API,
    EMBEDDINGS_API,
    RESPONSES_API,
    Api,
    Failure,
    Gateway,
    read_quietly,
    upstream_timeout,
)
from app.gateway.routing import DEFAULT_UPSTREAM
from app.gateway.streaming import StreamedCall

router = APIRouter(prefix="/v1", include_in_schema=False)


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _forward(api: Api, request: Request) -> Response:
    gateway = _gateway(request)
    try:
        call = await gateway.admit(api, request)
        gateway.start(call, request)
        await gateway.reserve(call)
    except GatewayError as exc:
        return exc.response()
    if not call.stream:
        return await gateway.forward_plain(call, request)
    result = await gateway.send(call, request, call.targets)
    if isinstance(result, Failure):
        await gateway.record_failure(call, result)
        return gateway.failure_response(result, call)
    response, target = result
    if response.status >= 400:  # a 4xx the upstream refused the call with
        failure = gateway.failure_of(response, await read_quietly(response))
        await gateway.record_failure(call, failure)
        return gateway.failure_response(failure, call)
    return StreamedCall(gateway, call, response, target)


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _forward(CHAT_API, request)


@router.post("/responses")
async def responses(request: Request) -> Response:
    return await _forward(RESPONSES_API, request)


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    return await _forward(EMBEDDINGS_API, request)


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "asa"}


async def _model_ids(gateway: Gateway, caller: Caller) -> list[str]:
    """The models the caller may use: its key's allow-list, else the routing table's models,
    else the default upstream's own list."""
    if caller.allowed_models is not None:
        return sorted(caller.allowed_models)
    listed = gateway.table.listed_models()
    if listed:
        return listed
    upstream = gateway.table.upstreams[DEFAULT_UPSTREAM]
    try:
        async with gateway.client.get(
            f"{upstream.base_url}/models",
            headers={"authorization": f"Bearer {upstream.api_key}"},
            timeout=upstream_timeout(10.0),
        ) as answer:
            ok = answer.status == 200
            data = (await answer.json(content_type=None)).get("data", []) if ok else []
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        data = []
    return sorted(
        {
            str(item["id"])
            for item in data
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        }
    )


@router.get("/models")
async def list_models(request: Request) -> Response:
    gateway = _gateway(request)
    try:
        caller = gateway.caller(request)
    except GatewayError as exc:
        return exc.response()
    ids = await _model_ids(gateway, caller)
    return JSONResponse({"object": "list", "data": [_model(m) for m in ids]})


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> Response:
    gateway = _gateway(request)
    try:
        caller = gateway.caller(request)
        caller.ensure_model_allowed(model)
    except GatewayError as exc:
        return exc.response()
    return JSONResponse(_model(model))  # every model has a route (the default one)


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
)
async def unknown(path: str) -> Response:
    return error_response(
        404,
        f"Unknown request URL: /v1/{path}. The gateway serves chat/completions, "
        "responses, embeddings and models.",
        code="unknown_url",
    )
