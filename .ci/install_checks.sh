#!/usr/bin/env bash
# Install-split checks (issue 10): each in its own fresh venv, with the constraints file.
#
#   base  `pip install -c constraints.txt <repo>` holds only torch's dependency closure + vespo
#         (+ pip/setuptools/wheel); vespo.losses imports without transformers; `vespo losses`
#         works; `vespo train` prints one line naming vespo[train] and exits 2.
#   verl  vespo's base install next to verl==0.9.1 with its real dependencies (hydra-core
#         included): pip check passes; `import verl` registers vespo's losses (entry point);
#         verl's actor worker runs one update with loss_mode=vespo on CPU (.ci/verl_update_check.py).
#   trl   vespo's base install next to trl==1.16.0 with its real dependencies: pip check passes;
#         vespo.integrations.trl imports without the train extra.
#
# Usage: .ci/install_checks.sh [base] [verl] [trl]   (default: all three, in this order)
# One PASS/FAIL line per check; the check's log is printed only when it fails; exit 1 if any fails.
# pip's cache is reused; the venvs live in a temp dir that is removed at the end.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
constraints="$repo/constraints.txt"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
unset PYTHONPATH VERL_USE_EXTERNAL_MODULES VIRTUAL_ENV

tmp="$(mktemp -d "${TMPDIR:-/tmp}/vespo-install-checks.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
export TMPDIR="$tmp" MPLCONFIGDIR="$tmp/mpl"

# The package source as the working tree has it (tracked + untracked, not ignored), copied so that
# building it leaves no build/ or *.egg-info in the repository.
src="$tmp/src"
mkdir -p "$src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then cp -P --parents -- "$f" "$src"; fi
    done; true)
else
    cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/src" "$src/"
fi

new_venv() {  # new_venv NAME -> $tmp/NAME, activated
    python3 -m venv "$tmp/$1"
    # shellcheck disable=SC1091
    . "$tmp/$1/bin/activate"
}

pip_install() {  # quiet; pip's config warnings about missing local index folders are dropped
    local start=$SECONDS
    pip install -q -c "$constraints" "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
    echo "$((SECONDS - start))" >"$tmp/$CHECK.pip_seconds"
}

no_cuda_wheels() {  # torch must be the CPU build 2.13.0, and nothing may have pulled CUDA wheels
    python - <<'EOF'
import importlib.metadata as md, sys
torch = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions()
              if d.metadata["Name"].lower().startswith(("nvidia-", "cuda-", "triton")))
if torch != "2.13.0+cpu" or cuda:
    sys.exit(f"torch {torch} (want 2.13.0+cpu), CUDA wheels: {cuda or 'none'}")
print(f"torch {torch}, no CUDA wheels")
EOF
}

check_base() {
    new_venv base
    pip_install "$src"
    no_cuda_wheels
    # Nothing beyond torch's dependency closure (from installed metadata, markers evaluated), vespo
    # and the venv's own pip/setuptools/wheel; and vespo's base requirements are torch alone.
    python "$repo/.ci/dist_closure.py" torch vespo
    python -c "import importlib.metadata as md, sys; base = [r for r in md.requires('vespo') or [] if 'extra ==' not in r]; print('vespo requires', base); sys.exit(0 if len(base) == 1 and base[0].startswith('torch') else 'vespo base requirements are not torch only')"
    cd "$tmp"
    python -c "import vespo.losses, sys; assert 'transformers' not in sys.modules, 'transformers imported'"
    vespo losses >"$tmp/losses.out"
    grep -q "vespo" "$tmp/losses.out" || { echo "vespo losses printed no vespo loss"; return 1; }
    set +e
    out="$(vespo train 2>&1)"
    rc=$?
    set -e
    echo "vespo train -> exit $rc: $out"
    [ "$rc" -eq 2 ] || { echo "vespo train: exit code $rc, want 2"; return 1; }
    [ "$(printf '%s\n' "$out" | grep -c .)" -eq 1 ] || { echo "vespo train: want exactly one line"; return 1; }
    printf '%s' "$out" | grep -qF 'vespo[train]' || { echo "vespo train: the line does not name vespo[train]"; return 1; }
}

check_verl() {
    new_venv verl
    # verl 0.9.1's worker module (verl.workers.engine_workers -> verl.workers.rollout.utils)
    # imports uvicorn and fastapi, which verl declares only in its `verl-core` extra; that extra
    # also pulls torchcodec, TransferQueue, nvtx, ... so only these two are added by name.
    pip_install "$src" verl==0.9.1 uvicorn fastapi
    no_cuda_wheels
    pip check
    python -c "import importlib.metadata as md; print('verl', md.version('verl'), '| hydra-core', md.version('hydra-core'), '| omegaconf', md.version('omegaconf'), '| antlr4', md.version('antlr4-python3-runtime'), '| transformers', md.version('transformers'))"
    cd "$tmp"
    python "$repo/.ci/verl_update_check.py"
}

check_trl() {
    new_venv trl
    pip_install "$src" trl==1.16.0
    no_cuda_wheels
    pip check
    cd "$tmp"
    # No train extra: the venv holds only what trl and vespo's base install pull.
    python "$repo/.ci/dist_closure.py" trl vespo
    python -c "import importlib.metadata as md, vespo.integrations.trl; print('trl', md.version('trl'), '| transformers', md.version('transformers'), '| vespo.integrations.trl imports')"
    python -c "import importlib.util, sys; bad = [m for m in ('reasoning_gym', 'math_verify') if importlib.util.find_spec(m)]; sys.exit(f'train-extra modules present: {bad}' if bad else 0)"
}

declare -A label=(
    [base]="base install: torch closure + vespo only; vespo.losses, 'vespo losses', 'vespo train' -> exit 2"
    [verl]="verl 0.9.1 env (real deps, hydra-core): pip check, entry-point registration, one actor update with loss_mode=vespo"
    [trl]="trl 1.16.0 env (real deps): pip check, vespo.integrations.trl imports without the train extra"
)

checks=("$@")
[ "${#checks[@]}" -gt 0 ] || checks=(base verl trl)
failed=0
total_start=$SECONDS
for name in "${checks[@]}"; do
    [ -n "${label[$name]:-}" ] || { echo "install_checks: unknown check '$name' (base, verl, trl)" >&2; exit 2; }
    log="$tmp/$name.log"
    start=$SECONDS
    set +e
    ( set -euo pipefail; CHECK=$name; "check_$name" ) >"$log" 2>&1
    rc=$?
    set -e
    took="$((SECONDS - start))s, pip install $(cat "$tmp/$name.pip_seconds" 2>/dev/null || echo '?')s"
    rm -rf "${tmp:?}/$name" &  # the venv is no longer needed; delete it while the next check runs
    if [ "$rc" -eq 0 ]; then
        echo "install_checks: PASS $name (${took}): ${label[$name]}"
    else
        echo "install_checks: FAIL $name (${took}, exit $rc): ${label[$name]}" >&2
        tail -n 60 "$log" | sed "s/^/    [$name] /" >&2
        failed=1
    fi
done
wait  # background deletions
echo "install_checks: $([ "$failed" -eq 0 ] && echo ok || echo FAILED) in $((SECONDS - total_start))s"
exit "$failed"
