"""The one error type users see for bad input; it imports nothing, so every room may raise it."""

from __future__ import annotations

__all__ = ["ConfigError", "a_or_an"]


class ConfigError(ValueError):
    """A configuration value, flag or input is missing, unknown or impossible; the message says what
    to change (the CLI prints it as one line and exits with status 2)."""


def a_or_an(word: str) -> str:
    """``"an image"``, ``"a text"``: the word with its indefinite article, for messages."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
