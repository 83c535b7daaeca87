"""The price tables a ``PriceBook`` prices from, and the compact reference of each.

A price table is genai-prices' bundled snapshot, optionally overlaid with a local price file
(``PRICES_FILE``): a JSON file in genai-prices' own data format (the ``data.json`` its project
publishes: a list of providers, each with its models and their prices), read once when the
service or the command starts; nothing is downloaded at run time. The file overrides and extends
the snapshot: a provider of the file replaces the snapshot's provider of the same id, with the
snapshot's models the file does not name kept after the file's own; a provider the snapshot lacks
is added.

Each source has a compact reference, recorded on every ``llm_usage`` row it priced
(``price_source``) and described once in the ``price_source`` table:

- ``genai-prices@0.2.3``: the bundled snapshot of that package version;
- ``file:<first 16 hex digits of the file's SHA-256>``: a local price file;
- ``overrides:<first 16 hex digits of the SHA-256 of PRICE_OVERRIDES' canonical JSON>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pydantic
from genai_prices import types as gp

from app.tracking.providers import Providers, bundled_providers

_REF_DIGITS = 16
_MAX_FILE_BYTES = 64 * 1024 * 1024  # the published data.json is ~2 MB


class PriceFileError(ValueError):
    """The local price file cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class PriceSource:
    """One source of prices: its compact reference and what it is."""

    ref: str
    kind: str  # genai-prices | file | overrides
    version: str  # the package version, or the SHA-256 of the file or of the overrides
    detail: str  # what an operator needs to find it again (the path, the overrides' JSON)


def snapshot_source() -> PriceSource:
    try:
        package = version("genai-prices")
    except PackageNotFoundError:  # pragma: no cover - genai-prices is a dependency
        package = "unknown"
    return PriceSource(
        ref=f"genai-prices@{package}",
        kind="genai-prices",
        version=package,
        detail="the snapshot bundled with the genai-prices package",
    )


def overrides_source(overrides: Mapping[str, Mapping[str, Decimal]]) -> PriceSource | None:
    if not overrides:
        return None
    canonical = json.dumps(
        {name: {k: str(v) for k, v in sorted(p.items())} for name, p in sorted(overrides.items())},
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return PriceSource(f"overrides:{digest[:_REF_DIGITS]}", "overrides", digest, canonical)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """The providers to price from, and where each model entry came from."""

    providers: Providers
    snapshot: PriceSource
    file: PriceSource | None = None
    # id() of each ModelInfo read from the file (the table keeps them alive).
    file_models: frozenset[int] = frozenset()

    def source_of(self, info: gp.ModelInfo) -> PriceSource:
        """The source of a model entry of this table."""
        if self.file is not None and id(info) in self.file_models:
            return self.file
        return self.snapshot


def bundled_table() -> PriceTable:
    return PriceTable(providers=bundled_providers(), snapshot=snapshot_source())


def load_price_file(path: Path) -> PriceTable:
    """The bundled snapshot overlaid with the price file at ``path``.

    Raises ``PriceFileError`` with the file's path and the reason when it cannot be read, is
    not JSON, or is not a list of providers in genai-prices' data format.
    """
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise PriceFileError(f"price file {path}: {size} bytes, more than the 64 MiB allowed")
        content = path.read_bytes()
    except OSError as exc:
        raise PriceFileError(f"price file {path}: cannot be read ({exc.strerror})") from exc
    try:
        raw = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PriceFileError(f"price file {path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, list) or not raw:
        raise PriceFileError(
            f"price file {path}: expected a non-empty JSON list of providers "
            "(genai-prices' data.json format)"
        )
    providers = _parse_providers(path, raw)
    digest = hashlib.sha256(content).hexdigest()
    source = PriceSource(f"file:{digest[:_REF_DIGITS]}", "file", digest, str(path.resolve()))
    merged, file_models = _overlay(bundled_providers(), providers)
    return PriceTable(merged, snapshot_source(), source, frozenset(file_models))


def _parse_providers(path: Path, raw: list[Any]) -> Providers:
    # genai-prices parses its own data.json with this (``UpdatePrices.fetch``); it has no public
    # name for it.
    from genai_prices.types import _providers_from_raw

    try:
        providers: Providers = _providers_from_raw(raw)
    except (pydantic.ValidationError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()
        reason = " ".join(line.strip() for line in first[:4])
        raise PriceFileError(f"price file {path}: not in genai-prices' format: {reason}") from exc
    ids = [p.id for p in providers]
    if len(set(ids)) != len(ids):
        raise PriceFileError(f"price file {path}: a provider id appears twice")
    return providers


def _overlay(base: Providers, overlay: Providers) -> tuple[Providers, set[int]]:
    """``base`` with each provider of ``overlay`` replacing (and extending) its namesake."""
    by_id = {p.id: p for p in overlay}
    file_models = {id(m) for p in overlay for m in p.models}
    merged: Providers = []
    for provider in base:
        new = by_id.pop(provider.id, None)
        if new is None:
            merged.append(provider)
            continue
        named = {m.id for m in new.models}
        kept = [m for m in provider.models if m.id not in named]
        merged.append(dataclasses.replace(new, models=[*new.models, *kept]))
    merged.extend(by_id.values())
    return merged, file_models
