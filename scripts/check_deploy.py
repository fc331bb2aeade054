#!/usr/bin/env python3
"""Validate every Kubernetes manifest under deploy/ against the Kubernetes API schemas.

    .venv/bin/python scripts/check_deploy.py [PATH ...] [--kubernetes-version 1.30.0]

PATHs (files or folders; default: deploy/) are searched for ``*.yaml``/``*.yml``; every
document in them (``---``-separated) must be a resource that validates strictly (unknown
fields are errors) with ``kubernetes-validate`` (PyPI; in the ``dev`` extra). Exit status: 0
all valid, 1 a manifest is invalid (each failure printed with its file and resource), 2 the
validator is not installed or nothing was found to validate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Files under deploy/ that are not Kubernetes manifests.
NOT_MANIFESTS = {"nginx.conf"}


def manifests(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, default=[ROOT / "deploy"])
    ap.add_argument("--kubernetes-version", default=None, help="default: the validator's latest")
    args = ap.parse_args(argv)
    try:
        import kubernetes_validate as kv
    except ImportError:
        print(
            "check_deploy: the validator is missing: install it with "
            "`.venv/bin/pip install kubernetes-validate` (part of the dev extra)",
            file=sys.stderr,
        )
        return 2
    version = args.kubernetes_version or kv.latest_version()
    files = manifests(args.paths)
    failures = checked = 0
    for f in files:
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except yaml.YAMLError as e:
            print(f"FAIL {f}: not YAML: {e}")
            failures += 1
            continue
        for doc in docs:
            what = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
            try:
                kv.validate(doc, version, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
                msg = getattr(e, "message", None) or str(e)
                path = "/".join(str(p) for p in getattr(e, "path", []) or [])
                print(f"FAIL {f} {what}: {msg}" + (f" (at {path})" if path else ""))
                failures += 1
            else:
                checked += 1
    if not checked and not failures:
        print("check_deploy: no manifests found", file=sys.stderr)
        return 2
    print(f"check_deploy: {checked} resources valid, {failures} invalid (Kubernetes {version})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
