"""A receiver can verify a webhook's signature and reject a replay."""

from __future__ import annotations

from app.notifications.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    new_signing_secret,
    signature,
    signed_headers,
    verify,
)

SECRET = "whsec_unit-test-secret-0123456789"
BODY = b'{"id":"task.finished:t1","kind":"task.succeeded"}'
NOW = 1_900_000_000.0


def test_a_signed_request_verifies() -> None:
    headers = signed_headers(SECRET, "task.finished:t1", BODY, now=NOW)
    assert headers["ASA-Event-Id"] == "task.finished:t1"
    assert verify(SECRET, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], BODY, now=NOW)


def test_a_changed_body_or_another_secret_fails() -> None:
    headers = signed_headers(SECRET, "e", BODY, now=NOW)
    ts, sig = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    assert not verify(SECRET, ts, sig, BODY + b" ", now=NOW)
    assert not verify(new_signing_secret(), ts, sig, BODY, now=NOW)
    # The timestamp is signed too: moving it forward breaks the signature.
    assert not verify(SECRET, str(int(NOW) + 1), sig, BODY, now=NOW)


def test_an_old_request_is_rejected_as_a_replay() -> None:
    headers = signed_headers(SECRET, "e", BODY, now=NOW - 301)
    assert not verify(SECRET, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], BODY, now=NOW)
    assert verify(
        SECRET,
        headers[TIMESTAMP_HEADER],
        headers[SIGNATURE_HEADER],
        BODY,
        now=NOW,
        tolerance_seconds=600,
    )


def test_missing_or_malformed_headers_fail() -> None:
    sig = signature(SECRET, int(NOW), BODY)
    assert not verify(SECRET, None, sig, BODY, now=NOW)
    assert not verify(SECRET, str(int(NOW)), None, BODY, now=NOW)
    assert not verify(SECRET, "yesterday", sig, BODY, now=NOW)


def test_any_of_several_signatures_is_enough_while_a_secret_rotates() -> None:
    sig = signature(SECRET, int(NOW), BODY)
    assert verify(SECRET, str(int(NOW)), f"v1=deadbeef, {sig}", BODY, now=NOW)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"1900000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1_900_000_000, BODY) == f"v1={expected}"
