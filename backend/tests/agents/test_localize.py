"""Localization on small real repositories with real test runs: what FixAgent's first prompt
shows, within its budget, and what a retry shows first."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from app.agents.fix_agent import FixRequest, compose_prompt
from app.agents.localize import localize, search_definitions
from app.agents.symbols import ModuleCache, build_index
from app.agents.tokens import estimate_tokens
from tests.support.repos import failing_pytest_output, make_repo

SHOP = {
    "shop/__init__.py": "",
    "shop/pricing.py": """\
        def unit_price(item):
            return item["cost"] / item["qty"]


        def discount(total, coupon):
            if coupon == "HALF":
                return total / 2
            return total
        """,
    "shop/cart.py": """\
        from shop.pricing import discount, unit_price


        def subtotal(items):
            return sum(unit_price(i) * i["qty"] for i in items)


        def total(items, coupon=None):
            return discount(subtotal(items), coupon) + 1
        """,
    "tests/__init__.py": "",
    "tests/test_cart.py": """\
        from shop.cart import total


        def test_total_without_coupon():
            assert total([{"cost": 10, "qty": 2}]) == 10


        def test_total_of_free_item():
            assert total([{"cost": 0, "qty": 0}]) == 0
        """,
}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    repo = make_repo(tmp_path_factory.mktemp("shop"), SHOP)
    return repo, failing_pytest_output(repo)


def test_an_assertion_failure_shows_the_called_function_whole_with_line_numbers(
    shop: tuple[Path, str],
) -> None:
    repo, output = shop
    request = FixRequest(repo, "total() adds 1 to every cart", "pytest -q", output)

    prompt, _ = compose_prompt(request, localize(repo, request.bug_description, output))

    # The faulty line, shown as code with its number: the traceback names only the test file.
    assert "    9|     return discount(subtotal(items), coupon) + 1" in prompt
    assert "    8| def total(items, coupon=None):" in prompt
    # The failing test's body, and no file shown from its top as a stand-in.
    assert "    4| def test_total_without_coupon():" in prompt
    assert "    1| from shop.cart import total" not in prompt


def test_every_frame_resolves_to_its_function_and_the_strongest_come_first(
    shop: tuple[Path, str],
) -> None:
    repo, output = shop

    loc = localize(repo, "a cart with a free item crashes", output)

    frames = [(f.path, f.symbol.qualname if f.symbol else None) for f in loc.frames]
    assert ("shop/pricing.py", "unit_price") in frames
    assert ("shop/cart.py", "subtotal") in frames
    assert ("shop/cart.py", "total") in frames
    # unit_price: the deepest frame of one failure; total: called by both failing tests.
    assert {f.symbol.qualname for f in loc.findings[:2]} == {"unit_price", "total"}
    assert {t.qualname for t in loc.tests} == {
        "test_total_without_coupon",
        "test_total_of_free_item",
    }


def test_the_prompt_fits_its_budget_and_names_what_was_left_out(tmp_path: Path) -> None:
    files = dict(SHOP)
    for n in range(40):  # a repository much larger than the budget
        body = "\n".join(f"    value_{k} = total(items) * {k}" for k in range(30))
        files[f"shop/report_{n}.py"] = (
            f"from shop.cart import total\n\n\ndef report_{n}(items):\n{body}\n    return value_1\n"
        )
    repo = make_repo(tmp_path, files)
    output = failing_pytest_output(repo)
    request = FixRequest(repo, "total() is wrong; see report_3 and report_7", "pytest", output)
    loc = localize(repo, request.bug_description, output)

    prompt, context = compose_prompt(request, loc, budget_tokens=1500)

    assert estimate_tokens(prompt) <= 1500
    assert "return discount(subtotal(items), coupon) + 1" in prompt
    assert context.left_out, "something had to be left out"
    assert "## Not shown for lack of room" in prompt
    for name in context.left_out:
        assert f"- {name}" in prompt


def test_a_retry_opens_with_the_feedback_and_the_code_the_previous_edit_touched(
    shop: tuple[Path, str],
) -> None:
    repo, output = shop
    previous = textwrap.dedent(
        """\
        diff --git a/shop/pricing.py b/shop/pricing.py
        --- a/shop/pricing.py
        +++ b/shop/pricing.py
        @@ -5,4 +5,4 @@ def unit_price(item):
         def discount(total, coupon):
             if coupon == "HALF":
        -        return total / 2
        +        return total // 2
             return total
        """
    )
    request = FixRequest(
        repo,
        "total() adds 1 to every cart",
        "pytest -q",
        output,
        feedback="The tests still fail after your edits: ...",
        previous_diff=previous,
    )

    prompt, _ = compose_prompt(
        request, localize(repo, request.bug_description, output, previous_diff=previous)
    )

    feedback_at = prompt.index("## Your previous attempt did not work")
    touched_at = prompt.index("## Code your previous edit changed")
    new_frames_at = prompt.index("## Where the bug most likely is")
    report_at = prompt.index("## Bug report")
    assert feedback_at < touched_at < new_frames_at < report_at
    touched = prompt[touched_at:new_frames_at]
    assert "    7|         return total / 2" in touched  # the code as it is now (reverted)


def test_definitions_in_other_languages_are_found_by_text_search(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "web/cart.js": "export function cartTotal(items) {\n  return items.length;\n}\n",
            "web/other.js": "// cartTotal is used by the checkout page\n",
        },
    )

    by_grep = search_definitions(repo, ["cartTotal"], ctags=None)

    assert [(h.path, h.line) for h in by_grep] == [("web/cart.js", 1)]
    loc = localize(repo, "`cartTotal()` counts items instead of adding prices", "")
    prompt, _ = compose_prompt(FixRequest(repo, "cartTotal is wrong", "npm test", ""), loc)
    assert "    2|   return items.length;" in prompt


@pytest.mark.skipif(shutil.which("ctags") is None, reason="Universal Ctags is not installed")
def test_universal_ctags_finds_the_same_definition(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path,
        {"web/cart.js": "export function cartTotal(items) {\n  return items.length;\n}\n"},
    )

    hits = search_definitions(repo, ["cartTotal"], ctags=shutil.which("ctags"))

    assert [(h.path, h.line) for h in hits] == [("web/cart.js", 1)]


def test_a_retry_reparses_only_the_files_that_changed(shop: tuple[Path, str]) -> None:
    repo, _ = shop
    cache: ModuleCache = {}
    first = build_index(repo, cache=cache)
    pricing = repo / "shop" / "pricing.py"
    original = pricing.read_text()
    try:
        pricing.write_text(original + "\n\ndef tax(total):\n    return total * 0.2\n")
        second = build_index(repo, cache=cache)
    finally:
        pricing.write_text(original)

    assert second.modules["shop/cart.py"] is first.modules["shop/cart.py"]
    assert second.modules["shop/pricing.py"] is not first.modules["shop/pricing.py"]
    assert [s.qualname for s in second.by_name["tax"]] == ["tax"]
