"""Edits proposed by a model, applied to a real directory: both formats, tolerance, refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from app.agents.edits import (
    EditError,
    FileDiff,
    SearchReplace,
    apply_edits,
    parse_edits,
)

CALC = """\
def add(a, b):
    return a - b


def mul(a, b):
    return a * b
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "calc.py").write_text(CALC)
    (root / "README.md").write_text("# demo\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True, timeout=30)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (outside .git) with its content."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


def apply_reply(root: Path, reply: str) -> None:
    apply_edits(root, parse_edits(reply))


def block(path: str, search: str, replace: str) -> str:
    """A search/replace block as a model writes it; ``search``/``replace`` end with newlines."""
    return f"{path}\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"


# --- search/replace blocks ---------------------------------------------------------------------


def test_search_replace_block_with_path_above_fence_edits_the_file(repo: Path) -> None:
    reply = """Fix the sign:

pkg/calc.py
```python
<<<<<<< SEARCH
def add(a, b):
    return a - b
=======
def add(a, b):
    return a + b
>>>>>>> REPLACE
```
"""
    result = apply_edits(repo, parse_edits(reply))

    assert result.changed == ("pkg/calc.py",)
    assert "return a + b" in (repo / "pkg" / "calc.py").read_text()
    assert result.notes == ()


@pytest.mark.parametrize(
    "path_line",
    ["`pkg/calc.py`", "**pkg/calc.py**", "### pkg/calc.py", "File: pkg/calc.py", "./pkg/calc.py"],
)
def test_search_replace_path_is_read_in_its_usual_decorations(repo: Path, path_line: str) -> None:
    reply = block(path_line, "    return a - b\n", "    return a + b\n")

    [edit] = parse_edits(reply)

    assert isinstance(edit, SearchReplace)
    assert edit.path.removeprefix("./") == "pkg/calc.py"
    apply_edits(repo, [edit])
    assert "return a + b" in (repo / "pkg" / "calc.py").read_text()


def test_path_inside_the_fence_is_read(repo: Path) -> None:
    edit = block("pkg/calc.py", "    return a * b\n", "    return b * a\n")
    reply = f"```python\n{edit}```\n"

    apply_reply(repo, reply)

    assert "return b * a" in (repo / "pkg" / "calc.py").read_text()


def test_several_blocks_in_several_files_apply_in_order(repo: Path) -> None:
    reply = """pkg/calc.py
```python
<<<<<<< SEARCH
    return a - b
=======
    return a + b
>>>>>>> REPLACE
```

```python
<<<<<<< SEARCH
    return a * b
=======
    return b * a
>>>>>>> REPLACE
```

README.md
```
<<<<<<< SEARCH
# demo
=======
# demo

Adds and multiplies.
>>>>>>> REPLACE
```
"""
    edits = parse_edits(reply)
    result = apply_edits(repo, edits)

    assert [edit.path for edit in edits] == ["pkg/calc.py", "pkg/calc.py", "README.md"]
    assert [edit.block for edit in edits] == [1, 2, 3]
    assert result.changed == ("pkg/calc.py", "README.md")
    text = (repo / "pkg" / "calc.py").read_text()
    assert "return a + b" in text
    assert "return b * a" in text
    assert (repo / "README.md").read_text() == "# demo\n\nAdds and multiplies.\n"


def test_trailing_whitespace_differences_are_tolerated(repo: Path) -> None:
    (repo / "pkg" / "calc.py").write_text(CALC.replace("return a - b", "return a - b   "))
    reply = block(
        "pkg/calc.py", "def add(a, b):\n    return a - b\n", "def add(a, b):\n    return a + b\n"
    )

    result = apply_edits(repo, parse_edits(reply))

    assert (repo / "pkg" / "calc.py").read_text() == CALC.replace("a - b", "a + b")
    assert result.notes == (
        "Edit block 1 (pkg/calc.py): matched with trailing-whitespace tolerance.",
    )


def test_uniform_indentation_difference_is_reapplied_to_the_replacement(repo: Path) -> None:
    source = "class Calc:\n    def add(self, a, b):\n        total = a - b\n        return total\n"
    (repo / "pkg" / "klass.py").write_text(source)
    # The model dropped the class-level indentation from both SEARCH and REPLACE.
    reply = """pkg/klass.py
<<<<<<< SEARCH
def add(self, a, b):
    total = a - b
    return total
=======
def add(self, a, b):
    total = a + b
    if total < 0:
        raise ValueError(total)
    return total
>>>>>>> REPLACE
"""
    result = apply_edits(repo, parse_edits(reply))

    assert (repo / "pkg" / "klass.py").read_text() == (
        "class Calc:\n    def add(self, a, b):\n        total = a + b\n"
        "        if total < 0:\n            raise ValueError(total)\n        return total\n"
    )
    assert "indentation" in result.notes[0]


def test_ambiguous_search_is_rejected_with_the_places_it_matches(repo: Path) -> None:
    (repo / "pkg" / "twice.py").write_text("x = 1\ny = 2\n\nx = 1\ny = 3\n")
    before = snapshot(repo)
    reply = block("pkg/twice.py", "x = 1\n", "x = 10\n")

    with pytest.raises(EditError) as caught:
        apply_reply(repo, reply)

    message = caught.value.message
    assert "Edit block 1 (pkg/twice.py)" in message
    assert "matches 2 places" in message
    assert "lines 1, 4" in message
    assert snapshot(repo) == before


def test_missing_search_is_rejected_with_the_most_similar_lines(repo: Path) -> None:
    before = snapshot(repo)
    reply = block(
        "pkg/calc.py", "def add(x, y):\n    return x - y\n", "def add(x, y):\n    return x + y\n"
    )

    with pytest.raises(EditError) as caught:
        apply_reply(repo, reply)

    message = caught.value.message
    assert "Edit block 1 (pkg/calc.py)" in message
    assert "does not match" in message
    assert "lines 1-2" in message
    assert "def add(a, b):\n    return a - b" in message
    assert snapshot(repo) == before


def test_empty_search_creates_a_new_file_with_its_directories(repo: Path) -> None:
    test_module = "from pkg.calc import add\n\n\ndef test_add():\n    assert add(2, 2) == 4\n"
    reply = "tests/test_calc.py\n```python\n" + block("", "", test_module).lstrip() + "```\n"

    result = apply_edits(repo, parse_edits(reply))

    assert result.created == ("tests/test_calc.py",)
    assert (repo / "tests" / "test_calc.py").read_text().endswith("assert add(2, 2) == 4\n")


def test_empty_search_on_an_existing_file_is_rejected(repo: Path) -> None:
    reply = block("README.md", "", "replaced\n")

    with pytest.raises(EditError, match="SEARCH is empty but the file already exists"):
        apply_reply(repo, reply)

    assert (repo / "README.md").read_text() == "# demo\n"


def test_search_in_a_missing_file_is_rejected(repo: Path) -> None:
    reply = block("pkg/nope.py", "a\n", "b\n")

    with pytest.raises(EditError, match=r"pkg/nope.py\): the file does not exist"):
        apply_reply(repo, reply)


def test_malformed_block_is_rejected_at_parse_time() -> None:
    with pytest.raises(EditError, match="has no '>>>>>>> REPLACE' line"):
        parse_edits("a.py\n<<<<<<< SEARCH\nx\n=======\ny\n")


def test_block_without_any_path_is_rejected() -> None:
    with pytest.raises(EditError, match="no file path"):
        parse_edits("<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n")


def test_reply_without_edits_parses_to_nothing_and_applying_nothing_is_refused(
    repo: Path,
) -> None:
    assert parse_edits("I think the bug is in add().") == []
    with pytest.raises(EditError, match="no edits"):
        apply_edits(repo, [])


def test_crlf_line_endings_are_preserved(repo: Path) -> None:
    (repo / "win.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n")

    apply_reply(repo, block("win.txt", "two\n", "2\n"))

    assert (repo / "win.txt").read_bytes() == b"one\r\n2\r\nthree\r\n"


def test_file_without_final_newline_keeps_it_that_way(repo: Path) -> None:
    (repo / "bare.txt").write_text("a\nb")

    apply_reply(repo, block("bare.txt", "b\n", "c\n"))

    assert (repo / "bare.txt").read_text() == "a\nc"


def test_binary_file_is_refused(repo: Path) -> None:
    (repo / "blob.bin").write_bytes(b"\xff\xfe\x00x\n")

    with pytest.raises(EditError, match="not UTF-8"):
        apply_reply(repo, block("blob.bin", "x\n", "y\n"))


# --- unified diffs -----------------------------------------------------------------------------


def test_unified_diff_in_a_fence_modifies_the_file(repo: Path) -> None:
    reply = """Here is the patch:

```diff
diff --git a/pkg/calc.py b/pkg/calc.py
index 1111111..2222222 100644
--- a/pkg/calc.py
+++ b/pkg/calc.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a - b
+    return a + b
```
"""
    edits = parse_edits(reply)
    result = apply_edits(repo, edits)

    assert isinstance(edits[0], FileDiff)
    assert edits[0].kind == "modify"
    assert result.changed == ("pkg/calc.py",)
    assert (repo / "pkg" / "calc.py").read_text() == CALC.replace("a - b", "a + b")


def test_diff_with_wrong_line_numbers_and_counts_applies_by_context(repo: Path) -> None:
    reply = """```diff
--- a/pkg/calc.py
+++ b/pkg/calc.py
@@ -40,7 +40,9 @@
 def mul(a, b):
-    return a * b
+    if a == 0:
+        return 0
+    return a * b
@@ -1,1 +1,1 @@
 def add(a, b):
-    return a - b
+    return a + b
```"""
    result = apply_edits(repo, parse_edits(reply))

    text = (repo / "pkg" / "calc.py").read_text()
    assert "if a == 0:\n        return 0\n    return a * b" in text
    assert "return a + b" in text
    assert any("hunk 1: applied at line 5" in note for note in result.notes)


def test_diff_hunk_matching_several_places_goes_where_its_header_says(repo: Path) -> None:
    (repo / "twice.py").write_text("x = 1\ny = 2\n\nx = 1\ny = 2\n")
    reply = (
        "```diff\n--- a/twice.py\n+++ b/twice.py\n@@ -4,2 +4,2 @@\n x = 1\n-y = 2\n+y = 3\n```\n"
    )

    apply_reply(repo, reply)

    assert (repo / "twice.py").read_text() == "x = 1\ny = 2\n\nx = 1\ny = 3\n"


def test_diff_hunk_blank_context_line_without_leading_space_is_context(repo: Path) -> None:
    reply = (
        "```diff\n--- a/pkg/calc.py\n+++ b/pkg/calc.py\n@@ -2,4 +2,4 @@\n"
        "     return a - b\n\n\n-def mul(a, b):\n+def multiply(a, b):\n```\n"
    )

    apply_reply(repo, reply)

    assert "def multiply(a, b):" in (repo / "pkg" / "calc.py").read_text()


def test_diff_from_dev_null_creates_a_file(repo: Path) -> None:
    reply = (
        "```diff\n--- /dev/null\n+++ b/docs/NOTES.md\n@@ -0,0 +1,2 @@\n+# Notes\n+Fixed add.\n```\n"
    )

    result = apply_edits(repo, parse_edits(reply))

    assert result.created == ("docs/NOTES.md",)
    assert (repo / "docs" / "NOTES.md").read_text() == "# Notes\nFixed add.\n"


def test_diff_to_dev_null_deletes_a_file(repo: Path) -> None:
    reply = "```diff\n--- a/README.md\n+++ /dev/null\n@@ -1 +0,0 @@\n-# demo\n```\n"

    result = apply_edits(repo, parse_edits(reply))

    assert result.deleted == ("README.md",)
    assert not (repo / "README.md").exists()


def test_diff_hunk_that_does_not_match_names_the_hunk(repo: Path) -> None:
    before = snapshot(repo)
    reply = (
        "```diff\n--- a/pkg/calc.py\n+++ b/pkg/calc.py\n@@ -1,2 +1,2 @@\n"
        " def add(a, b):\n-    return b - a\n+    return a + b\n```\n"
    )

    with pytest.raises(EditError) as caught:
        apply_reply(repo, reply)

    assert "Edit block 1 (pkg/calc.py), hunk 1: the hunk's context and '-' lines" in (
        caught.value.message
    )
    assert snapshot(repo) == before


def test_diff_renaming_a_file_is_refused() -> None:
    with pytest.raises(EditError, match="renames are not supported"):
        parse_edits("```diff\n--- a/x.py\n+++ b/y.py\n@@ -1 +1 @@\n-a\n+b\n```\n")


# --- safety: nothing outside the workspace, nothing in .git, all or nothing --------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside.txt", "contains '..'"),
        ("pkg/../../outside.txt", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        (".git/config", "inside .git"),
        ("pkg/.GIT/hooks/pre-commit", "inside .git"),
        ("pkg\\calc.py", "not a usable path"),
    ],
)
def test_path_escapes_are_refused_and_nothing_is_written(
    repo: Path, path: str, reason: str
) -> None:
    before = snapshot(repo)
    git_config = (repo / ".git" / "config").read_bytes()
    reply = block(path, "", "pwned\n")

    with pytest.raises(EditError, match=reason):
        apply_reply(repo, reply)

    assert snapshot(repo) == before
    assert (repo / ".git" / "config").read_bytes() == git_config
    assert not (repo.parent / "outside.txt").exists()


def test_symlink_to_a_file_outside_is_refused(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("keep\n")
    (repo / "link.txt").symlink_to(secret)

    with pytest.raises(EditError, match="resolves outside the repository"):
        apply_reply(repo, block("link.txt", "keep\n", "pwned\n"))

    assert secret.read_text() == "keep\n"


def test_symlinked_directory_to_outside_is_refused_for_new_files(
    repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (repo / "out").symlink_to(outside, target_is_directory=True)

    with pytest.raises(EditError, match="resolves outside the repository"):
        apply_reply(repo, block("out/new.py", "", "pwned\n"))

    assert list(outside.iterdir()) == []


def test_symlink_into_dot_git_is_refused(repo: Path) -> None:
    (repo / "cfg").symlink_to(repo / ".git" / "config")
    git_config = (repo / ".git" / "config").read_bytes()

    with pytest.raises(EditError, match=r"resolves into \.git"):
        apply_reply(
            repo,
            block("cfg", "[core]\n", "[core]\n\thooksPath = /tmp\n"),
        )

    assert (repo / ".git" / "config").read_bytes() == git_config


def test_one_failing_block_means_no_file_is_written(repo: Path) -> None:
    before = snapshot(repo)
    reply = """pkg/calc.py
<<<<<<< SEARCH
    return a - b
=======
    return a + b
>>>>>>> REPLACE

new_module.py
<<<<<<< SEARCH
=======
VALUE = 1
>>>>>>> REPLACE

README.md
<<<<<<< SEARCH
# not the title
=======
# title
>>>>>>> REPLACE

../escape.txt
<<<<<<< SEARCH
=======
x
>>>>>>> REPLACE
"""
    with pytest.raises(EditError) as caught:
        apply_reply(repo, reply)

    message = caught.value.message
    # Every problem is reported at once, so the model can fix them in one round trip.
    assert "Edit block 3 (README.md)" in message
    assert "Edit block 4 (../escape.txt)" in message
    assert "Edit block 1" not in message
    assert "No edits were applied" in message
    assert snapshot(repo) == before
    assert not (repo.parent / "escape.txt").exists()


def test_edited_file_keeps_its_mode(repo: Path) -> None:
    script = repo / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)

    apply_reply(repo, block("run.sh", "echo hi\n", "echo hello\n"))

    assert os.stat(script).st_mode & 0o777 == 0o755
    assert script.read_text() == "#!/bin/sh\necho hello\n"


def test_line_numbers_copied_from_the_prompt_are_not_part_of_the_search(repo: Path) -> None:
    reply = block(
        "pkg/calc.py",
        "    1| def add(a, b):\n    2|     return a - b\n",
        ("    1| def add(a, b):\n    2|     return a + b\n"),
    )

    apply_reply(repo, reply)

    assert (repo / "pkg" / "calc.py").read_text() == CALC.replace("a - b", "a + b")
