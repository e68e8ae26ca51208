"""Generated SMTP passwords: random, and usable as a command-line argument."""

from __future__ import annotations

import secrets

import pytest

from smartrelay.passwords import generate_password, hash_password, verify_password


def test_a_generated_password_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool given "-..." as an argument (swaks --auth-password) takes it for an option:
    such a draw is thrown away for the next."""
    draws = iter(["-Ab3xYz", "--double", "Ok9-_x"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert generate_password() == "Ok9-_x"


def test_generated_passwords_are_random_and_verify() -> None:
    made = {generate_password() for _ in range(2000)}
    assert len(made) == 2000
    assert all(len(p) == 24 and not p.startswith("-") for p in made)
    one = next(iter(made))
    assert verify_password(one, hash_password(one))
