"""Tests that need real data the checkout may lack: skip on a developer's machine, fail in CI.

``CI=true`` (GitHub Actions, GitLab, ... set it; ``.ci/run`` runs ``scripts/test.sh`` under it) means "this run
must prove everything": a test that cannot find its data fails instead of skipping, so a CI machine without the
development data can never pass on skips. Elsewhere the test is skipped with the reason, and
``scripts/test.sh``'s summary line counts such skips.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

MISSING_DATA = "missing data"  # every skip reason given here starts with this (scripts/test.sh counts them)


def in_ci() -> bool:
    """True when the environment variable ``CI`` is set to anything but ``''``, ``0``, ``false`` or ``no``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_data(path: Path, what: str, how_to_get: str = "") -> Path:
    """``path`` when it exists; otherwise skip the test (``pytest.skip``), or fail it under ``CI=true``."""
    path = Path(path)
    if path.exists():
        return path
    reason = f"{MISSING_DATA}: {what} not found at {path}" + (f" ({how_to_get})" if how_to_get else "")
    if in_ci():
        pytest.fail(f"{reason}; CI=true: a test must not skip for missing data", pytrace=False)
    pytest.skip(reason)
