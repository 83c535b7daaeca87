"""What the bubblewrap sandbox shows a command, and the settings that shape it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import BACKEND_DIR, Settings
from app.sandbox.bwrap import INSTALL_HINT, SandboxPolicy, default_toolchain_paths, probe_bwrap
from app.sandbox.runner import detect_isolation, run_sandboxed

needs_bwrap = pytest.mark.skipif(
    detect_isolation().bwrap is None,
    reason=f"no working bubblewrap here: {detect_isolation().bwrap_missing}",
)


def test_the_default_toolchain_is_the_system_and_the_interpreter_never_the_venv() -> None:
    paths = default_toolchain_paths()

    assert Path("/usr") in paths
    assert Path(os.path.realpath(sys.base_prefix)) in paths or sys.base_prefix.startswith("/usr")
    assert not any(path == Path(sys.prefix) or Path(sys.prefix) in path.parents for path in paths)
    assert not any(path == BACKEND_DIR or path in BACKEND_DIR.parents for path in paths)


@pytest.mark.parametrize(
    "path", ["/", "/etc", "/root", "/tmp", "/run/postgresql", str(BACKEND_DIR / ".venv")]
)
def test_read_only_paths_that_would_show_the_service_or_the_host_are_refused(path: str) -> None:
    with pytest.raises(ValidationError, match="SANDBOX_RO_PATHS"):
        Settings(sandbox_ro_paths=[Path("/usr"), Path(path)])


def test_a_broken_bubblewrap_is_reported_with_what_to_install(tmp_path: Path) -> None:
    assert INSTALL_HINT in str(probe_bwrap(str(tmp_path / "no-bwrap-here")))


@needs_bwrap
def test_a_program_the_sandbox_cannot_see_is_refused_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="inside the sandbox"):
        run_sandboxed([sys.executable, "-c", "pass"], tmp_path, timeout_s=10)  # the venv's


@needs_bwrap
def test_the_configured_toolchain_is_all_the_sandbox_sees_of_the_host(tmp_path: Path) -> None:
    policy = SandboxPolicy(toolchain=(Path("/usr"), Path("/bin"), Path("/lib"), Path("/lib64")))

    result = run_sandboxed(
        ["/bin/sh", "-c", "ls -A / /etc /tmp"], tmp_path, timeout_s=10, policy=policy
    )

    listed = result.output.split("\n\n")
    assert result.exit_code == 0, result.output
    assert set(listed[0].split()[1:]) == {
        "bin", "dev", "etc", "lib", "lib64", "proc", "tmp", "usr"
    }  # fmt: skip
    assert set(listed[1].split()[1:]) == {"group", "hosts", "passwd"}
