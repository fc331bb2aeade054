"""Training text every Python installation already has: the standard library's source."""

from __future__ import annotations

import sysconfig
from pathlib import Path

#: Files read for the tokenizer and the tiny model, in this order; deterministic across
#: machines with the same Python minor version.
_EXCLUDE_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & _EXCLUDE_DIRS)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_text(max_bytes: int) -> str:
    """Concatenated standard-library sources, up to ``max_bytes`` UTF-8 bytes."""
    parts: list[str] = []
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n")
        size = len(text.encode())
        if total + size > max_bytes:
            break
        parts.append(text)
        total += size
    return "\n\n".join(parts)
