# Sourced by scripts/serve and scripts/test: make sure .venv exists and holds the project with
# the extras named in $1 (comma separated). Re-installs only when pyproject.toml or the extras
# changed since the last install, so later runs start in seconds.
set -euo pipefail
extras="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: KVaaS needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.kvaas-install"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "==> installing kvaas[$extras] into .venv (the first time takes a few minutes: vLLM and torch)"
  "$venv/bin/python" -m pip install --progress-bar on --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install --progress-bar on -e "$root[$extras]"
  echo "$want" > "$stamp"
else
  echo "==> .venv is up to date (kvaas[$extras])"
fi
