"""What a test run and a bug report say about where a bug is: every frame, the failing tests,
the names a user writes."""

from __future__ import annotations

from app.agents.signals import (
    Frame,
    TestId,
    failing_tests,
    mentioned_names,
    mentioned_paths,
    parse_frames,
)

PYTEST_LONG = """\
=================================== FAILURES ===================================
______________________________ test_total_price _______________________________

    def test_total_price():
>       assert checkout([item(2)]) == 4

tests/test_shop.py:12:
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _
shop/cart.py:30: in checkout
    return sum(price(i) for i in items)
shop/cart.py:30: in <genexpr>
    return sum(price(i) for i in items)
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _

    def price(item):
>       return item.cost / item.qty
E       ZeroDivisionError: division by zero

shop/pricing.py:7: ZeroDivisionError
_________________________ TestCart.test_empty[none] __________________________

    def test_empty(self):
>       assert total([]) == 0
E       assert None == 0

tests/test_shop.py:40: AssertionError
=========================== short test summary info ============================
FAILED tests/test_shop.py::test_total_price - ZeroDivisionError: division by zero
FAILED tests/test_shop.py::TestCart::test_empty[none] - assert None == 0
2 failed, 5 passed in 0.12s
"""

NATIVE = """\
Traceback (most recent call last):
  File "/work/repo/app/main.py", line 4, in <module>
    run()
  File "/work/repo/app/runner.py", line 18, in run
    step()
ValueError: bad step
"""


def test_every_frame_of_every_traceback_is_read_with_the_deepest_marked() -> None:
    frames = parse_frames(PYTEST_LONG)

    assert [(f.path, f.line) for f in frames] == [
        ("tests/test_shop.py", 12),
        ("shop/cart.py", 30),
        ("shop/pricing.py", 7),
        ("tests/test_shop.py", 40),
    ]
    assert [f.path for f in frames if f.deepest] == ["shop/pricing.py", "tests/test_shop.py"]
    assert Frame("shop/cart.py", 30, "checkout") in frames


def test_native_python_frames_keep_their_function_names() -> None:
    frames = parse_frames(NATIVE)

    assert [(f.path, f.line, f.function) for f in frames] == [
        ("/work/repo/app/main.py", 4, "<module>"),
        ("/work/repo/app/runner.py", 18, "run"),
    ]
    assert frames[-1].deepest


def test_other_languages_frames_are_read_as_path_and_line() -> None:
    output = "    at total (src/cart.js:14:9)\n    at Object.<anonymous> (test/cart.test.js:5:3)\n"

    assert [(f.path, f.line) for f in parse_frames(output)] == [
        ("src/cart.js", 14),
        ("test/cart.test.js", 5),
    ]


def test_failing_tests_come_from_the_summary_in_their_most_precise_form() -> None:
    assert failing_tests(PYTEST_LONG) == [
        TestId("tests/test_shop.py", "test_total_price", None),
        TestId("tests/test_shop.py", "test_empty", "TestCart"),
    ]


def test_unittest_failures_name_module_and_class() -> None:
    output = "FAIL: test_rounding (tests.test_money.MoneyTest.test_rounding)\n"

    assert failing_tests(output) == [TestId("tests/test_money.py", "test_rounding", "MoneyTest")]


def test_code_in_a_report_weighs_more_than_prose() -> None:
    report = (
        "Calling `cart.total()` on an empty cart returns None; apply_coupon also rounds wrong, "
        "see shop/pricing.py. The checkout page is affected."
    )

    weights = {m.name: m.weight for m in mentioned_names(report)}

    assert weights["cart.total"] > weights["apply_coupon"] > weights["checkout"]
    assert "the" not in weights and "returns" not in weights
    assert mentioned_paths(report) == ["shop/pricing.py"]
