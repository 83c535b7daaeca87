"""What a sandboxed command is: an argument vector (no shell) and an environment built from an
allowlist, never copied wholesale from the service's."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|DATABASE_URL|DSN", re.IGNORECASE
)
_SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", ">", ">>", "<", "<<", "2>&1"})


class InvalidTestCommand(ValueError):
    """The test command cannot be run as an argument vector."""


def parse_test_command(command: str | Sequence[str]) -> list[str]:
    """An argument vector for ``command``: a command line is split like a POSIX shell would.

    Shell operators (``|``, ``&&``, ``>`` ...) are refused rather than passed on as arguments;
    a command that needs them must say ``sh -c '...'`` explicitly.
    """
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise InvalidTestCommand(f"cannot split the test command: {exc}") from exc
    else:
        argv = list(command)
    if not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
        raise InvalidTestCommand("the test command is empty")
    if any("\x00" in arg for arg in argv):
        raise InvalidTestCommand("the test command contains a NUL character")
    operators = sorted({arg for arg in argv if arg in _SHELL_OPERATORS})
    if operators:
        raise InvalidTestCommand(
            f"the test command uses shell operators {operators}, but no shell runs it; "
            "use \"sh -c '...'\" if a shell is really needed"
        )
    return argv


def build_child_env(
    home: Path,
    *,
    env_allow: Iterable[str] = (),
    extra_env: Mapping[str, str] | None = None,
    secret_names: Iterable[str] = (),
) -> dict[str, str]:
    """The complete environment of a sandboxed child.

    Fixed entries, plus ``env_allow`` names copied from this process (only those), plus
    ``extra_env``. A name in ``secret_names`` or one that looks like a credential raises
    ``ValueError``: the caller asked for something that must not leave the service.
    """
    env = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "CI": "true",  # test runners then skip watch modes and interactive prompts
        "GIT_TERMINAL_PROMPT": "0",
    }
    forbidden = {name.upper() for name in secret_names}
    requested = {name: os.environ[name] for name in env_allow if name in os.environ}
    requested.update(extra_env or {})
    for name, value in requested.items():
        if name.upper() in forbidden or _SECRET_NAME.search(name):
            raise ValueError(f"refusing to pass {name} to a sandboxed command: it may be a secret")
        env[name] = value
    return env
