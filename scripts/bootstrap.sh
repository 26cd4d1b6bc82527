#!/usr/bin/env bash
# Sets up everything pyhybrid needs on a fresh Debian/Ubuntu machine, once:
#   * libLLVM >= 16 for Dr.Jit's CPU backend (Debian 12 ships 15 as default, which aborts in Dr.Jit 1.5),
#   * a local virtual environment .venv with the CPU build of torch and pyhybrid installed editable.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p | grep -qE 'libLLVM(-(1[6-9]|[2-9][0-9])\.so|\.so\.(1[6-9]|[2-9][0-9]))'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing libllvm19 (Dr.Jit CPU backend)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libllvm19 >/dev/null
  else
    echo "bootstrap: Dr.Jit needs libLLVM >= 16; install it (e.g. 'sudo apt-get install libllvm19')" >&2
    exit 1
  fi
fi

stamp=.venv/.pyhybrid-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: creating .venv (torch CPU wheel, drjit, h5py, ...)" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU wheel keeps CI small; GPU users install a CUDA torch into .venv themselves. On Linux
  # x86_64, where pip's configured sources would pick a build without "+cpu" (PyPI's bundles CUDA,
  # several GB), torch comes from PyTorch's CPU index instead; if the check itself fails (offline,
  # a mirror), the configured sources are used as they are.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    chosen=$(.venv/bin/python -m pip install -q --dry-run --report - torch==2.13.0 | .venv/bin/python -c \
      'import json, sys; print(next(i["metadata"]["version"] for i in json.load(sys.stdin)["install"] if i["metadata"]["name"] == "torch"))' \
      2>/dev/null || true)
    if [[ -n "$chosen" && "$chosen" != *+cpu && "$(uname -sm)" == "Linux x86_64" ]]; then
      echo "bootstrap: torch 2.13.0 from PyTorch's CPU index (pip's configured sources offer torch $chosen)" >&2
      .venv/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    else
      .venv/bin/python -m pip install -q torch==2.13.0
    fi
  fi
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
