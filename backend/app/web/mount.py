"""Puts the console on an application: its routes at ``/`` and its static files."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.web.render import STATIC_DIR, STATIC_PATH
from app.web.routes import console_router


def install_console(app: FastAPI) -> None:
    app.include_router(console_router())
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="console-static")
