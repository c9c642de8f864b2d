"""A missing peer skips a test locally and fails it in CI.

CI (``CI=true``, as GitHub Actions and most CI systems set it) installs every peer the
suite talks to (``.ci/run``) and has ``../shared`` beside the clone, so a peer it lacks
is a broken CI setup, not a reason to pass green with tests that never ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "need", "needs"]


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to true / 1 / yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def need(reason: str) -> NoReturn:
    """Skip with ``reason`` locally; in CI fail with the same message."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def needs(reason: str | None) -> pytest.MarkDecorator:
    """A mark for a test or module whose peer may be missing: ``reason`` None means it is there.

    ``tests/conftest.py`` turns the mark into :func:`need` when each marked test sets up.
    """
    return pytest.mark.needs_peer(reason)
