"""The before/after runner and the hot-path microbenchmark run as `docs/BENCHMARKS.md` says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``bench/<script> args`` run from ``backend/`` as the docs say; it must succeed."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT / "backend",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def test_the_hot_path_microbenchmark_reports_each_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "hot_path.py"), "--number", "50"],
        cwd=ROOT / "backend",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout)
    assert set(figures) == {
        "params_six_statements_sqlite_us",
        "params_six_statements_postgresql_us",
        "rollup_values_us",
        "row_values_us",
    }
    assert all(value > 0 for value in figures.values())


def test_the_call_pieces_microbenchmark_times_each_piece_on_the_event_loop() -> None:
    figures = json.loads(run_bench("call_pieces.py", "--number", "50").stdout)["per_call"]
    pieces = ("prepare", "reserve_nowait", "response_fields", "success_outcome", "metrics")
    assert set(figures) == {f"{piece}_us" for piece in pieces} | {"sum_us"}
    assert all(figures[f"{piece}_us"] > 0 for piece in pieces)


def test_run_tree_imports_app_from_the_tree_it_is_given(tmp_path: Path) -> None:
    """A copy of ``app`` elsewhere is what the script runs against, not the installed tree."""
    other = tmp_path / "before"
    (other / "backend").mkdir(parents=True)
    subprocess.run(
        ["cp", "-r", str(ROOT / "backend" / "app"), str(other / "backend" / "app")], check=True
    )
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_tree.py"), str(other), "hot_path.py", "--number", "5"],
        cwd=ROOT / "backend",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"code: {other / 'backend' / 'app' / '__init__.py'}" in done.stderr
    assert "rollup_values_us" in json.loads(done.stdout)


def test_the_write_elsewhere_experiment_commits_every_row_through_the_writer_process() -> None:
    done = run_bench("write_elsewhere.py", "--rounds", "1", "--modes", "process,none")
    runs = {run["mode"]: run for run in json.loads(done.stdout)["runs"]}
    assert runs["process"]["rows_written"] == 200  # a warm-up round and one measured, 100 each
    assert runs["none"]["rows_written"] == 0
    assert all(run["tracked_vs_raw_throughput"] > 0 for run in runs.values())


def test_compare_writers_runs_both_writers_and_every_row_is_written() -> None:
    done = run_bench(
        "llm_overhead.py", "--compare-writers", "--rounds", "1", "--concurrency", "10", "--limits"
    )
    result = json.loads(done.stdout)
    rounds = result["concurrent_10"]
    assert rounds["raw_round_ms"] > 0
    assert {"thread", "process"} <= rounds.keys()
    assert all(rounds[w]["tracked_vs_raw_throughput"] > 0 for w in ("thread", "process"))
    # a warm-up round and a measured one of 10 calls for each writer, every row committed,
    # the process-written ones by the writer process
    assert result["rows_written"] == {"thread": 20, "process": 20}
    assert result["rows_by_writer_process"] == 20
    assert isinstance(result["ack_messages_read_on_the_event_loop"], int)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two CPUs")
def test_compare_writers_pinned_puts_the_caller_apart_from_the_simulator_and_writer() -> None:
    done = run_bench(
        "llm_overhead.py", "--compare-writers", "--pin", "--rounds", "1", "--concurrency", "10"
    )
    result = json.loads(done.stdout)
    pinned = result["pinned"]
    assert pinned["caller"] != pinned["simulator_and_writer"]
    assert result["rows_written"] == {"thread": 20, "process": 20}


def test_the_overhead_bench_freezes_the_heap_as_the_service_does_unless_told_not_to() -> None:
    args = ("--concurrent-only", "--rounds", "1", "--concurrency", "5")
    frozen = json.loads(run_bench("llm_overhead.py", *args).stdout)
    unfrozen = json.loads(run_bench("llm_overhead.py", *args, "--no-freeze").stdout)
    assert frozen["startup_heap_frozen"] is True
    assert unfrozen["startup_heap_frozen"] is False
    assert frozen["rows_written"] == unfrozen["rows_written"] == 10


def test_the_gc_stall_bench_times_a_started_service_frozen_and_not() -> None:
    done = run_bench("gc_stall.py", "--runs", "1", "--collections", "2")
    runs = {run["variant"]: run for run in json.loads(done.stdout)["runs"]}
    assert runs["unfrozen"]["objects_frozen"] == 0
    assert runs["frozen"]["objects_frozen"] > 50_000
    # what a full collection still visits once the start-up heap is frozen: a small part of it
    assert runs["frozen"]["objects_collections_visit"] * 4 < runs["frozen"]["objects_frozen"]
    assert all(run["full_collection_ms_median"] > 0 for run in runs.values())


def test_pin_goes_only_with_compare_writers() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "llm_overhead.py"), "--pin"],
        cwd=ROOT / "backend",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--pin goes with --compare-writers" in done.stderr
