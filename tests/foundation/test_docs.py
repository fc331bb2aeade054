"""The documentation: ``mkdocs.yml`` lists pages that exist, the site builds in strict mode
(no broken link or anchor, no page left out of the navigation), and the README's links into
``docs/`` reach pages of the site."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _nav_pages(nav: Any) -> Iterator[str]:
    """Every page path in a MkDocs ``nav`` (entries are paths, ``{title: path}`` or
    ``{title: [entries]}``); external links are skipped."""
    if isinstance(nav, str):
        if "://" not in nav:
            yield nav
    elif isinstance(nav, list):
        for entry in nav:
            yield from _nav_pages(entry)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _config() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert isinstance(config, dict)
    return config


def test_every_nav_page_exists() -> None:
    config = _config()
    assert config.get("strict") is True
    pages = list(_nav_pages(config["nav"]))
    assert "index.md" in pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages in mkdocs.yml nav but not in docs/: {missing}"


def test_site_builds_strictly(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_into_docs_reach_nav_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    links = {t.split("#", 1)[0] for t in re.findall(r"\]\((docs/[^)\s]+)\)", readme)}
    targets = {t for t in links if t.endswith(".md")}
    assert targets, "README links to no docs page"
    pages = {f"docs/{p}" for p in _nav_pages(_config()["nav"])}
    assert targets <= pages, f"README links to pages outside the site: {sorted(targets - pages)}"
    missing = sorted(t for t in links - targets if not (ROOT / t).is_file())
    assert not missing, f"README links to files that do not exist: {missing}"
