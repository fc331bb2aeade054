"""Test prerequisites (programs, privileges) in one place.

A test that cannot run here calls :func:`require`. Outside CI a missing prerequisite skips the
test with the reason; under CI (``CI=true`` in the environment) it fails the run, so a CI
machine that lacks something the suite needs can never pass by skipping tests.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """Whether the suite runs under CI (``CI`` set to ``true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: object, what: str) -> None:
    """Return when ``condition`` is true; otherwise skip the test (outside CI) or fail it
    (under CI). ``what`` names the missing prerequisite, e.g. ``"redis-server on PATH"``."""
    if condition:
        return
    if in_ci():
        pytest.fail(
            f"missing test prerequisite: {what}. CI needs it (CI=true turns this skip into a "
            "failure); install or enable it on the CI machine",
            pytrace=False,
        )
    pytest.skip(f"missing test prerequisite: {what}")


def require_program(name: str) -> str:
    """The path of the program ``name`` on ``PATH`` (see :func:`require` when it is absent)."""
    path = shutil.which(name)
    require(path is not None, f"{name} on PATH")
    assert path is not None
    return path
