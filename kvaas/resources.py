"""Data directories shipped with KVaaS: found in a source checkout or inside an installed wheel.

``migrations/`` and ``billing/`` live at the repository root; the wheel packages them as
``kvaas/_migrations`` and ``kvaas/_billing`` (``pyproject.toml``'s ``force-include``).
"""

from __future__ import annotations

from pathlib import Path


def packaged_dir(name: str, marker: str) -> Path:
    """The directory ``name`` (``<repo>/<name>`` or ``kvaas/_<name>``) that holds ``marker``;
    ``FileNotFoundError`` when this installation has neither."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / f"_{name}"):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"the {name} directory is missing from this installation")
