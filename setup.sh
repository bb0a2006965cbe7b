#!/usr/bin/env bash
# Creates .venv and installs evomerge into it; idempotent. Both README commands call it.
# torch is installed first, pinned, only when the venv has none: a bare `torch` requirement on a
# machine without it pulls several GB of CUDA wheels. Users who bring their own torch keep it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS=${EVOMERGE_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.evomerge-installed
want="$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16) extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==${EVOMERGE_TORCH_VERSION:-2.13.0}"
fi
TORCH_NOW=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_NOW" > .venv/torch-constraint.txt
"$VPY" -m pip install -q -c .venv/torch-constraint.txt -e ".[$EXTRAS]"
echo "$want" > "$stamp"
