"""ASA's OpenAI-compatible gateway against LiteLLM's proxy, in front of the same upstream.

One run starts one nginx upstream (``gateway_procs.py`` says why nginx), LiteLLM's proxy and
ASA's service (one worker process each, both pointed at that nginx), and drives all three
targets with ``wrk`` (C, event loop; ``apt-get install wrk``) posting the same chat completion:

- **direct**: the client straight to the upstream, the baseline;
- **litellm**: through LiteLLM's proxy (master key, no database: it persists nothing);
- **asa**: through ``POST /v1/chat/completions`` of ASA's service (an ASA key; every call is one
  ``llm_usage`` row committed before the response).

Three phases, targets interleaved round by round so drift on a shared machine hits all alike:

1. sequential: one connection (``wrk -t1 -c1``), ``--rounds`` rounds of ``--seconds`` each;
2. 50 concurrent connections (``wrk -t1 -c50``), same rounds;
3. capacity: connections stepped 1, 2, 4, ... 128 per proxy (until even the median call takes
   100 ms: a closed loop only queues more from there); the figure is the highest calls/s of a
   step whose p99 stays under 100 ms (one step spoiled by a stall does not end the search).

Added latency = the proxy's percentile minus the direct call's, each percentile taken over all
rounds of its phase. CPU/call = the server's CPU time (all its processes and threads) over the
calls it answered. ``--nice -10`` (root) gives the benchmark's session a larger CPU share on a
shared machine while it runs; ``--pin`` puts the proxies on CPU 1 and nginx and wrk on CPU 0 (by
default the scheduler places them: a proxy pinned next to a busy neighbour waits out whole time
slices).

    cd backend && .venv/bin/python ../bench/gateway.py --nice -10 [--rounds 5] [--seconds 5]

``--targets direct,litellm`` runs without ASA (e.g. while the gateway does not exist: the run
says so when ``POST /v1/chat/completions`` is not served); ``--postgres ADMIN_URL`` puts ASA on
a scratch PostgreSQL database (created, then dropped) instead of a fresh SQLite file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from gateway_procs import (
    LITELLM_BIN,
    REQUEST,
    Endpoint,
    Placement,
    asa_service,
    group_cpu_seconds,
    litellm_proxy,
    nginx_upstream,
    post_chat,
    priority,
)

P99_LIMIT_MS = 100.0
CONCURRENT = 50
STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
GRID = [(i + 0.5) / 10 for i in range(1000)]  # percentiles 0.05 ... 99.95, equal weights
PROXY_CPUS, LOAD_CPUS = "1", "0"
LITELLM_VERSION = "import importlib.metadata as m; print('litellm', m.version('litellm'))"

# wrk's Lua hooks: the request, and at the end the counts and 1,000 percentiles as JSON.
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{body}'
done = function(summary, latency, requests)
  local out = io.open("{out}", "w")
  local e = summary.errors
  out:write(string.format('{{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"grid":[',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  for i, p in ipairs({{{grid}}}) do
    if i > 1 then out:write(",") end
    out:write(latency:percentile(p))
  end
  out:write("]}}")
  out:close()
end
"""


class Target:
    def __init__(self, name: str, endpoint: Endpoint, scratch: Path) -> None:
        self.name, self.url = name, f"{endpoint.url}/chat/completions"
        self.pgid = endpoint.pgid
        self.completed = 0  # calls answered, over every run (the probe included)
        self.result_path = scratch / f"{name}.json"
        self.script = scratch / f"{name}.lua"
        self.script.write_text(
            LUA.format(
                key=endpoint.key,
                body=json.dumps(REQUEST),
                out=self.result_path,
                grid=",".join(f"{p:g}" for p in GRID),
            )
        )


def wrk(target: Target, connections: int, seconds: int, place: Placement) -> dict[str, Any]:
    """One wrk run; its counts, calls/s and latency grid (ms)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    command += ["-s", str(target.script), target.url]
    command = place.wrap(command)
    target.result_path.unlink(missing_ok=True)
    cpu_before = group_cpu_seconds(target.pgid)
    subprocess.run(command, capture_output=True, check=True, timeout=seconds + 60)
    cpu = group_cpu_seconds(target.pgid) - cpu_before
    run = json.loads(target.result_path.read_text())
    run["grid"] = [v / 1000 for v in run.pop("grid")]
    run["errors"] = sum(run[k] for k in ("connect", "read", "write", "status", "timeout"))
    run["rps"] = run["requests"] / (run["duration_us"] / 1e6)
    run["connections"] = connections
    run["cpu_s"] = cpu  # the server's CPU time (all its processes and threads) during the run
    target.completed += run["requests"]
    print(
        f"  {target.name:8} c{connections:<4} {run['rps']:9.1f} calls/s  "
        f"p50 {percentile([run], 50):8.3f} ms  p99 {percentile([run], 99):8.3f} ms  "
        f"CPU {1000 * cpu / max(run['requests'], 1):6.3f} ms/call  errors {run['errors']}",
        file=sys.stderr,
    )
    return run


def percentile(runs: list[dict[str, Any]], p: float) -> float:
    """The ``p`` percentile of the union of runs (each grid point weighs requests/1000)."""
    points = sorted((value, run["requests"] / len(GRID)) for run in runs for value in run["grid"])
    total = sum(weight for _, weight in points)
    seen = 0.0
    for value, weight in points:
        seen += weight
        if seen >= total * p / 100:
            return float(value)
    return float(points[-1][0])


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {}
    for name, command in {
        "nginx": ["nginx", "-v"],
        "wrk": ["wrk", "-v"],
        "litellm": [str(LITELLM_BIN.parent / "python"), "-c", LITELLM_VERSION],
    }.items():
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:  # e.g. no LiteLLM venv: that target is not run either
            versions[name] = "not installed"
            continue
        versions[name] = ((done.stdout + done.stderr).strip().splitlines() or ["?"])[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        **versions,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def phase(
    targets: list[Target], connections: int, rounds: int, seconds: int, place: Placement
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    load_before = os.getloadavg()[0]
    for index in range(rounds):
        order = targets[index % len(targets) :] + targets[: index % len(targets)]
        for target in order:
            runs[target.name].append(wrk(target, connections, seconds, place))
    out: dict[str, Any] = {
        "connections": connections,
        "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for name, done in runs.items():
        out[name] = {
            "p50_ms": percentile(done, 50),
            "p99_ms": percentile(done, 99),
            "rps": sum(r["requests"] for r in done) / sum(r["duration_us"] / 1e6 for r in done),
            "requests": sum(r["requests"] for r in done),
            "errors": sum(r["errors"] for r in done),
            "cpu_ms_per_call": 1000
            * sum(r["cpu_s"] for r in done)
            / max(sum(r["requests"] for r in done), 1),
        }
    if "direct" in out:
        for name in runs:
            if name != "direct":
                out[name]["added_p50_ms"] = out[name]["p50_ms"] - out["direct"]["p50_ms"]
                out[name]["added_p99_ms"] = out[name]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def capacity(
    proxies: list[Target], steps: tuple[int, ...], seconds: int, place: Placement
) -> dict[str, Any]:
    """Step the connections; per proxy, the best calls/s of a step with p99 under the limit."""
    table: dict[str, list[dict[str, Any]]] = {t.name: [] for t in proxies}
    live = list(proxies)
    for connections in steps:
        for target in list(live):
            run = wrk(target, connections, seconds, place)
            p99 = percentile([run], 99)
            table[target.name].append(
                {
                    "connections": connections,
                    "rps": run["rps"],
                    "p50_ms": percentile([run], 50),
                    "p99_ms": p99,
                    "errors": run["errors"],
                    "cpu_ms_per_call": 1000 * run["cpu_s"] / max(run["requests"], 1),
                    "load_1m": round(os.getloadavg()[0], 2),
                }
            )
            if percentile([run], 50) >= P99_LIMIT_MS:  # from here on p99 can only be over
                live.remove(target)
    best = {
        name: max((s["rps"] for s in rows if s["p99_ms"] < P99_LIMIT_MS), default=0.0)
        for name, rows in table.items()
    }
    return {"steps": table, "best_rps_p99_under_100ms": best}


def probe(name: str, endpoint: Endpoint) -> None:
    status, body = post_chat(endpoint.url, endpoint.key)
    usage = body.get("usage")
    if status == 404 and name == "asa":
        raise SystemExit(
            "ASA's gateway is missing: POST /v1/chat/completions answered 404 "
            "(backend/app/gateway/ not served yet). Rerun with --targets direct,litellm."
        )
    if status != 200 or not isinstance(usage, dict) or usage.get("total_tokens") != 29:
        raise SystemExit(f"{name}: POST /v1/chat/completions answered {status}: {body}")


def usage_rows(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM llm_usage")).scalar_one())
    finally:
        engine.dispose()


def postgres_counters(database_url: str) -> dict[str, int]:
    """The database's transaction and row counters (``pg_stat_database``) and the server's WAL
    flushes (``pg_stat_wal``): their deltas over a run, per call, say what a call costs there."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT xact_commit, tup_inserted, tup_updated, (SELECT wal_sync FROM "
                    "pg_stat_wal) FROM pg_stat_database WHERE datname = current_database()"
                )
            ).one()
    finally:
        engine.dispose()
    return dict(zip(("commits", "inserted", "updated", "wal_flushes"), map(int, row), strict=True))


@contextlib.contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database ``gwbench_<random>`` on the server of ``admin_url``, dropped
    afterwards; yields its URL."""
    name = f"gwbench_{secrets.token_hex(6)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def table(results: dict[str, Any]) -> str:
    lines = []
    for label, key in (("sequential", "sequential"), ("50 concurrent", "concurrent")):
        ph = results[key]
        lines.append(f"\n{label} (load 1m {ph['load_1m'][0]} -> {ph['load_1m'][1]}), ms:")
        lines.append(
            "target   p50     p99     added p50  added p99  calls/s   requests  errors  CPU/call"
        )
        for name in results["targets"]:
            r = ph[name]
            lines.append(
                f"{name:8} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} "
                f"{r.get('added_p50_ms', 0):10.3f} {r.get('added_p99_ms', 0):10.3f} "
                f"{r['rps']:9.1f} {r['requests']:9d} {r['errors']:7d} {r['cpu_ms_per_call']:8.3f}"
            )
    cap = results.get("capacity")
    if cap:
        lines.append("\ncapacity (connections: calls/s, p99 ms):")
        for name, rows in cap["steps"].items():
            steps = "  ".join(
                f"c{s['connections']}: {s['rps']:.0f}/{s['p99_ms']:.0f}" for s in rows
            )
            lines.append(f"{name:8} {steps}")
        lines.append(f"best calls/s with p99 < 100 ms: {cap['best_rps_p99_under_100ms']}")
    if "rows" in results:
        lines.append(f"\nASA llm_usage rows: {results['rows']} for {results['asa_calls']} calls")
    if "postgres_per_call" in results:
        per_call = ", ".join(f"{k} {v:.2f}" for k, v in results["postgres_per_call"].items())
        lines.append(f"PostgreSQL, per ASA call: {per_call}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="direct,litellm,asa")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="capacity steps")
    parser.add_argument("--pin", action="store_true", help="proxies on CPU 1, nginx/wrk on 0")
    parser.add_argument(
        "--nice", type=int, help="niceness of the benchmark's processes (root for < 0)"
    )
    database = parser.add_mutually_exclusive_group()
    database.add_argument("--database-url", help="ASA's database (default: a fresh SQLite file)")
    database.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="ASA on a scratch PostgreSQL database created (and dropped) on this server",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    if not set(names) <= {"direct", "litellm", "asa"} or "direct" not in names:
        parser.error("--targets: direct plus any of litellm, asa")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: apt-get install -y wrk")
    pin = args.pin and (os.cpu_count() or 1) >= 2
    proxy_place = Placement(PROXY_CPUS if pin else None)
    load_place = Placement(LOAD_CPUS if pin else None)
    results: dict[str, Any] = {"machine": machine(), "targets": names}
    results["placement"] = {"pinned": pin}
    results["machine"]["rerun"] = " ".join(["../bench/gateway.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmp, ExitStack() as stack:
        results["placement"]["priority"] = stack.enter_context(priority(args.nice))
        scratch = Path(tmp)
        upstream = stack.enter_context(nginx_upstream(scratch, load_place))
        endpoints = {"direct": upstream}
        if "litellm" in names:
            endpoints["litellm"] = stack.enter_context(
                litellm_proxy(scratch, upstream.url, proxy_place)
            )
        if args.postgres:
            database_url = stack.enter_context(scratch_postgres(args.postgres))
        else:
            database_url = args.database_url or f"sqlite:///{scratch / 'asa' / 'bench.db'}"
        url = sa.make_url(database_url)
        results["database"], results["database_name"] = url.get_backend_name(), url.database
        postgres = "asa" in names and url.get_backend_name() == "postgresql"
        if "asa" in names:
            endpoints["asa"] = stack.enter_context(
                asa_service(scratch, upstream.url, proxy_place, database_url)
            )
        targets = []
        for name in names:
            probe(name, endpoints[name])
            targets.append(Target(name, endpoints[name], scratch))
            targets[-1].completed += 1
        counters_before = postgres_counters(database_url) if postgres else None
        for target in targets:  # warm-up: connections, caches, JIT-free but lazy imports
            wrk(target, 8, min(args.seconds, 2), load_place)
        results["sequential"] = phase(targets, 1, args.rounds, args.seconds, load_place)
        results["concurrent"] = phase(targets, CONCURRENT, args.rounds, args.seconds, load_place)
        steps = tuple(int(s) for s in args.steps.split(",") if s)
        proxies = [t for t in targets if t.name != "direct"]
        if proxies and steps:
            results["capacity"] = capacity(proxies, steps, args.seconds, load_place)
        if "asa" in names:
            results["rows"] = usage_rows(database_url)
            results["asa_calls"] = next(t.completed for t in targets if t.name == "asa")
        if counters_before is not None:
            time.sleep(1)  # the statistics collector reports with a short delay
            after = postgres_counters(database_url)
            # The service's background jobs are included, and the WAL flushes are the server's.
            results["postgres_per_call"] = {
                name: (after[name] - counters_before[name]) / results["asa_calls"] for name in after
            }
        results["load_1m_end"] = round(os.getloadavg()[0], 2)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
