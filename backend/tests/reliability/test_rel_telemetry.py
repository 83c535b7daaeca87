"""Scenario 4: the OTLP collector unreachable and /metrics scraped every 100 ms during a stream.

The service exports spans over OTLP/gRPC to a loopback port nothing listens on (every export
fails, the batch processor's bounded queue fills and drops), while a scraper in the test reads
``GET /metrics`` every 100 ms, as a Prometheus with a 100 ms scrape interval would, and the
service's resident memory is sampled.

Counted: every call returns successfully and has its row (the collector being down changes
nothing for callers); every scrape answers 200; the last scrape's ``llm_requests_total`` equals
the calls made; the service's RSS grows by less than ``RSS_GROWTH_LIMIT_MIB`` between the end of
the warm-up and the end of the stream, and by less than ``RSS_SECOND_HALF_GROWTH_LIMIT_MIB`` in
the second half of it (spans are dropped once the exporter's bounded queue is full, not hoarded).

CI: 3 s warm-up, 6 s measured. Full (``ASA_RELIABILITY_FULL=1``): 30 s warm-up, 120 s measured.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.reliability import Ledger, SimulatorProcess, read_call_log, size, wait_until

LANES = {"sync": 2, "stream": 1, "async": 1}
WARM_UP_SECONDS = size(3.0, 30.0)
MEASURED_SECONDS = size(6.0, 120.0)
SCRAPE_INTERVAL_SECONDS = 0.1
RSS_GROWTH_LIMIT_MIB = 64
# The span queue (4096 spans) is full after a few hundred calls; from then on memory is flat.
RSS_SECOND_HALF_GROWTH_LIMIT_MIB = 16


def _dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _requests_total(body: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(body):
        if family.name == "llm_requests":
            total += sum(s.value for s in family.samples if s.name == "llm_requests_total")
    return total


class Scraper:
    """GET /metrics every ``interval`` seconds until stopped; statuses and the last body."""

    def __init__(self, url: str, interval: float) -> None:
        self._url = url
        self._interval = interval
        self._stop = threading.Event()
        self.statuses: list[int | str] = []
        self.seconds: list[float] = []
        self.last_body = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = http.get(f"{self._url}/metrics")
                    self.statuses.append(response.status_code)
                    self.last_body = response.text
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                self.seconds.append(time.monotonic() - started)
                self._stop.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_dead_collector_and_fast_scrapes_leave_calls_and_memory_unaffected(
    start_service: Any,
    sqlite_file_url: str,
    sim: SimulatorProcess,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    ledger = Ledger(sqlite_file_url)
    service = start_service(
        sqlite_file_url,
        enable_opentelemetry="true",
        otel_exporter_otlp_endpoint=f"http://127.0.0.1:{_dead_port()}",
    )
    rss_start = service.rss_kib()
    scraper = Scraper(service.url, SCRAPE_INTERVAL_SECONDS)
    scraper.start()
    service.stream("otel", LANES)
    time.sleep(WARM_UP_SECONDS)
    rss_warm = service.rss_kib()
    samples = []
    deadline = time.monotonic() + MEASURED_SECONDS
    while time.monotonic() < deadline:
        samples.append(service.rss_kib())
        time.sleep(0.5)
    rss_end = service.rss_kib()
    service.drain()
    returned = service.returned()
    # one more scrape after the drain: the counters include every call
    time.sleep(2 * SCRAPE_INTERVAL_SECONDS)
    assert wait_until(lambda: len(scraper.statuses) > 0, timeout=5)
    scraper.stop()
    final_body = httpx.get(f"{service.url}/metrics", timeout=10).text
    stopped_at = time.monotonic()
    service.stop()
    stop_seconds = time.monotonic() - stopped_at

    entries = read_call_log(service.call_log)
    count = ledger.count(entries, sim.stats())
    ledger.close()
    ordered = sorted(scraper.seconds)
    figures.update(
        count.figures(),
        measured_seconds=MEASURED_SECONDS,
        calls_per_second=round(returned / (WARM_UP_SECONDS + MEASURED_SECONDS), 1),
        scrapes=len(scraper.statuses),
        scrape_p50_ms=round(1000 * ordered[len(ordered) // 2], 1),
        scrape_p99_ms=round(1000 * ordered[int(len(ordered) * 0.99)], 1),
        rss_start_mib=round(rss_start / 1024, 1),
        rss_after_warm_up_mib=round(rss_warm / 1024, 1),
        rss_end_mib=round(rss_end / 1024, 1),
        rss_max_mib=round(max(samples) / 1024, 1),
        rss_measured_quarters_mib=[
            round(samples[min(len(samples) - 1, q * len(samples) // 4)] / 1024, 1) for q in range(5)
        ],
        shutdown_seconds=round(stop_seconds, 1),
    )

    assert count.returned == returned > 0
    assert count.returned_ok == count.returned, "a call failed while the collector was down"
    assert count.lost == []
    assert count.duplicated == []
    assert count.rows == count.success_rows == count.sim_succeeded == count.returned
    bad = [s for s in scraper.statuses if s != 200]
    assert bad == [], f"{len(bad)} of {len(scraper.statuses)} scrapes failed: {bad[:5]}"
    assert len(scraper.statuses) >= MEASURED_SECONDS / SCRAPE_INTERVAL_SECONDS / 4
    assert _requests_total(final_body) == count.returned
    assert (rss_end - rss_warm) / 1024 < RSS_GROWTH_LIMIT_MIB
    assert (rss_end - samples[len(samples) // 2]) / 1024 < RSS_SECOND_HALF_GROWTH_LIMIT_MIB
