"""The processes ``gateway.py`` measures: an nginx upstream, LiteLLM's proxy, ASA's service.

Each is a context manager that starts one process group on a free loopback port, waits until it
answers, yields what a client needs (base URL, bearer key), and kills the whole group on exit
(also when the benchmark fails half way). Nothing here reads the network beyond 127.0.0.1.

- ``nginx_upstream``: a stock Debian nginx (``apt-get install nginx-light``), one worker, with an
  unprivileged config in the scratch directory that answers ``POST /v1/chat/completions`` with a
  fixed OpenAI chat completion (``usage`` included). It answers ~50k calls/s from one connection
  here, over 100 times what either proxy forwards, so it is not the bottleneck; a Python server
  (our simulator) tops out near 1,000 calls/s on this machine, too close to the proxies.
- ``litellm_proxy``: ``litellm --config`` from its own venv (``/opt/litellm-venv``, outside the
  repository's), one worker, a master key, no database (so it persists no spend), the model
  cost map read from the package (``LITELLM_LOCAL_MODEL_COST_MAP``: nothing downloaded at start)
  and telemetry off.
- ``asa_service``: ``uvicorn app.main:create_app --factory`` from ``backend/.venv`` (one worker
  process, as ``make run`` starts it) on a fresh database migrated to head, with one ASA key
  issued by ``asa keys create`` and ``OPENAI_BASE_URL`` pointing at the upstream.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[1] / "backend"
LITELLM_BIN = Path(os.environ.get("LITELLM_BIN", "/opt/litellm-venv/bin/litellm"))
MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-upstream-bench"  # what both proxies send upstream; nginx ignores it
LITELLM_MASTER_KEY = "sk-litellm-bench"
START_TIMEOUT_SECONDS = 120.0
REPLY = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1796044104,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A short reply.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 15, "completion_tokens": 14, "total_tokens": 29},
}
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "Reply with one sentence."}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True, slots=True)
class Placement:
    """The CPUs a process may run on (``taskset -c cpus``; None: wherever the scheduler likes)."""

    cpus: str | None = None

    def wrap(self, command: list[str]) -> list[str]:
        return ["taskset", "-c", self.cpus, *command] if self.cpus else command


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a client needs (the ``/v1`` base URL and a bearer key) and the server's process
    group, whose CPU time ``group_cpu_seconds`` reads."""

    url: str
    key: str
    pgid: int


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process (all threads) of process group ``pgid``."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime are fields 14 and 15 of stat(5)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def priority(nice: int | None) -> Iterator[str]:
    """Run the block, and every process it starts, at the niceness ``nice`` (None: unchanged);
    the previous niceness is restored afterwards. Yields what was set, for the report.

    With the kernel's autogroups on (``/proc/sys/kernel/sched_autogroup_enabled``), niceness
    only ranks processes within one session, and each session gets an equal share against the
    others: so the session's own autogroup niceness is set, which is what weighs against the
    other sessions of the machine (and, until restored, any other process of this session).
    The children stay in this session (``process_group=0`` below, not a new session).
    """
    if nice is None:
        yield "unchanged"
        return
    autogroup = Path("/proc/self/autogroup")
    enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if autogroup.exists() and enabled.exists() and enabled.read_text().strip() == "1":
        before = autogroup.read_text().split()[-1]  # "/autogroup-114 nice 0"
        autogroup.write_text(str(nice))
        try:
            yield f"session autogroup nice {nice}"
        finally:
            autogroup.write_text(before)
        return
    previous = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield f"process nice {nice}"
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, previous)  # lowering needs root, as raising did


def post_chat(url: str, key: str, timeout: float = 10.0) -> tuple[int, dict[str, object]]:
    """One chat completion (stdlib only): the status and the decoded body."""
    request = urllib.request.Request(
        f"{url}/chat/completions",
        data=json.dumps(REQUEST).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body or b"{}")
        except ValueError:
            return error.code, {"raw": body.decode(errors="replace")[:300]}


@contextlib.contextmanager
def process_group(
    command: list[str], log: Path, **popen: object
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` in its own process group (so its children die with it), output to ``log``.

    The group stays in this session, so it shares the niceness ``priority`` gave it."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, process_group=0, **popen
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def wait_until_answering(
    url: str, key: str, process: subprocess.Popen[bytes], log: Path, name: str
) -> None:
    """Poll with a chat completion until something answers (any HTTP status), bounded."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {process.returncode} at start:\n{tail}")
        try:
            post_chat(url, key, timeout=2)
            return
        except (OSError, ValueError):
            time.sleep(0.25)
    raise RuntimeError(f"{name} did not answer within {START_TIMEOUT_SECONDS:.0f} s (log: {log})")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  server {{
    listen 127.0.0.1:{port};
    location = /v1/chat/completions {{
      default_type application/json;
      return 200 '{reply}';
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx_upstream(tmp: Path, place: Placement) -> Iterator[Endpoint]:
    """A fixed-reply OpenAI upstream served by nginx (base URL ``.../v1``)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is not installed: apt-get install -y nginx-light")
    directory = tmp / "nginx"
    directory.mkdir()
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(tmp=directory, port=port, reply=json.dumps(REPLY, separators=(",", ":")))
    )
    command = place.wrap([nginx, "-c", str(conf), "-p", str(directory)])
    url = f"http://127.0.0.1:{port}/v1"
    log = directory / "nginx.log"
    with process_group(command, log) as process:
        wait_until_answering(url, UPSTREAM_KEY, process, log, "nginx")
        yield Endpoint(url, UPSTREAM_KEY, process.pid)


@contextlib.contextmanager
def litellm_proxy(tmp: Path, upstream: str, place: Placement) -> Iterator[Endpoint]:
    """LiteLLM's proxy routing ``MODEL`` to ``upstream``, its master key the client's."""
    if not LITELLM_BIN.exists():
        raise RuntimeError(
            f"{LITELLM_BIN} is missing: python3 -m venv /opt/litellm-venv && "
            "/opt/litellm-venv/bin/pip install 'litellm[proxy]==1.80.0'"
        )
    directory = tmp / "litellm"
    directory.mkdir()
    # JSON is YAML: the config format of https://docs.litellm.ai/docs/proxy/configs
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": upstream,
                    "api_key": UPSTREAM_KEY,
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    (directory / "config.yaml").write_text(json.dumps(config, indent=2))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_URL"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    command = [str(LITELLM_BIN), "--config", str(directory / "config.yaml")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    command += ["--telemetry", "False"]
    url = f"http://127.0.0.1:{port}/v1"
    log = directory / "litellm.log"
    with process_group(place.wrap(command), log, cwd=directory, env=env) as process:
        wait_until_answering(url, LITELLM_MASTER_KEY, process, log, "LiteLLM's proxy")
        yield Endpoint(url, LITELLM_MASTER_KEY, process.pid)


def _asa_env(tmp: Path, database_url: str, upstream: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ASA_"))}
    env.update(
        DATABASE_URL=database_url,
        SPOOL_DIR=str(tmp / "spool"),
        OPENAI_BASE_URL=upstream,
        OPENAI_API_KEY=UPSTREAM_KEY,
        WEB_SESSION_SECRET_FILE=str(tmp / "web-session-secret"),
    )
    return env


@contextlib.contextmanager
def asa_service(
    tmp: Path, upstream: str, place: Placement, database_url: str | None = None
) -> Iterator[Endpoint]:
    """ASA's service on a fresh database, the client's key one ``asa keys create`` issued."""
    directory = tmp / "asa"
    directory.mkdir()
    database_url = database_url or f"sqlite:///{directory / 'bench.db'}"
    env = _asa_env(directory, database_url, upstream)
    venv = BACKEND / ".venv" / "bin"
    for step in (
        [str(venv / "alembic"), "upgrade", "heads"],
        [str(venv / "asa"), "keys", "create", "--user", "bench", "--json"],
    ):
        done = subprocess.run(
            step, cwd=BACKEND, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step[1:])} failed:\n{done.stdout}\n{done.stderr}")
    key = str(json.loads(done.stdout)["key"])
    port = free_port()
    command = [str(venv / "uvicorn"), "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/v1"
    log = directory / "asa.log"
    with process_group(place.wrap(command), log, cwd=BACKEND, env=env) as process:
        wait_until_answering(url, key, process, log, "ASA's service")
        yield Endpoint(url, key, process.pid)
