"""Service-level endpoints: ``/health`` and ``/metrics``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Response
from pydantic import BaseModel
from sqlalchemy import text

from app.api.auth import AccessModeDep, require_metrics_token
from app.api.deps import RuntimeDep
from app.core.redaction import redact
from app.core.runtime import Runtime
from app.observability import render_metrics
from app.tracking.breaker import BreakerState, database_breaker
from app.tracking.write_process import ProcessState

router = APIRouter()
WriterState = Literal["process", "starting", "down", "thread"]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    llm_mode: Literal["simulator", "provider"]
    llm_endpoint: str
    spool_pending: int
    opentelemetry: bool
    auth_mode: Literal["open", "keys"]
    # "open": an outage was met; tracking spools rows and settlements without waiting for the
    # database, and a background probe closes it when the database answers again.
    database_breaker: BreakerState
    # Who commits async callers' rows: "process" (the writer process, TRACKING_WRITER=process),
    # "thread", or the writer process "starting" / "down" (the thread writes meanwhile).
    tracking_writer: WriterState


@router.get("/health", response_model=HealthResponse, tags=["service"])
def health(runtime: RuntimeDep, auth_mode: AccessModeDep) -> HealthResponse:
    """Liveness with substance: is the database reachable, and where do LLM calls go."""
    breaker = database_breaker(runtime.engine).state
    try:
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        database: Literal["ok", "unreachable"] = "ok"
    except Exception:
        database = "unreachable"
    return HealthResponse(
        status="ok" if database == "ok" and breaker == "closed" else "degraded",
        database=database,
        llm_mode="simulator" if runtime.simulator is not None else "provider",
        llm_endpoint=redact(runtime.llm_endpoint, runtime.settings.secret_values),
        spool_pending=runtime.writer.spool.pending(),
        opentelemetry=runtime.settings.enable_opentelemetry,
        auth_mode=auth_mode,
        database_breaker=breaker,
        tracking_writer=_tracking_writer(runtime),
    )


_WRITER_STATES: dict[ProcessState, WriterState] = {
    "up": "process",
    "starting": "starting",
    "idle": "starting",  # started at startup, or by the first write
    "down": "down",
    "closed": "down",
}


def _tracking_writer(runtime: Runtime) -> WriterState:
    process = runtime.db_worker.process
    return "thread" if process is None else _WRITER_STATES[process.state]


@router.get(
    "/metrics",
    tags=["service"],
    response_class=Response,
    dependencies=[Depends(require_metrics_token)],
)
def metrics(runtime: RuntimeDep, accept: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus exposition; OpenMetrics (with trace-id exemplars) when the scraper asks."""
    body, content_type = render_metrics(accept, runtime.settings.prometheus_multiproc_dir)
    return Response(content=body, media_type=content_type)
