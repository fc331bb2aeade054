"""Fixtures of the store fault tests: the store tests' real tiers (re-used from
``tests/store/conftest.py``), a private Redis that can be SIGKILLed and a small tmpfs that
really fills up."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kvtest.prereq import require, require_program
from store.conftest import (  # noqa: F401 - fixtures shared with the store tests
    Tenant,
    blob,
    fast_breaker,
    make_conn,
    make_store,
    new_tenant,
    private_redis,
    redis_prefix,
    tenant,
)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("2m")``: a freshly mounted tmpfs of that size (a filesystem that really fills
    up: ENOSPC), unmounted after the test. Needs root and ``mount``."""
    require(os.geteuid() == 0, "root (to mount a small tmpfs for a real ENOSPC)")
    mount = require_program("mount")
    mounted: list[Path] = []

    def factory(size: str) -> Path:
        mnt = tmp_path / f"fs-{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        require(r.returncode == 0, f"permission to mount a tmpfs ({r.stderr.strip()})")
        mounted.append(mnt)
        return mnt

    yield factory
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
