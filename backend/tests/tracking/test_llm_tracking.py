"""What a provider may quote back of a prompt is masked in stored error messages."""

from __future__ import annotations

import json

from app.core.redaction import MASK, safe_error_message
from app.tracking.tracker import prompt_fragments

PROMPT = 'Fix "is_even" in mathlib.py\nIt returns True for odd numbers\nok'


def test_prompt_texts_lines_and_their_json_forms_are_fragments() -> None:
    fragments = prompt_fragments(
        [
            {"role": "user", "content": PROMPT},
            {"role": "user", "content": [{"type": "text", "text": "part text of a message"}]},
            {"role": "assistant", "content": None},
        ]
    )

    assert PROMPT in fragments and json.dumps(PROMPT)[1:-1] in fragments
    assert "It returns True for odd numbers" in fragments
    assert "ok" not in fragments  # short lines are not masked on their own
    assert "part text of a message" in fragments
    assert prompt_fragments("not a list") == ()


def test_a_provider_error_quoting_the_prompt_is_stored_without_it() -> None:
    quoted = json.dumps({"messages": [{"role": "user", "content": PROMPT}]})
    error = RuntimeError(f"Error code: 400 - invalid request: {quoted}; also: {PROMPT[:27]}")

    message = safe_error_message(error, prompt_fragments([{"role": "user", "content": PROMPT}]))

    assert "is_even" not in message and "odd numbers" not in message
    assert MASK in message and message.startswith("Error code: 400")
