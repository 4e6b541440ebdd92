"""Fail if the environment holds a distribution outside the dependency closure of the given roots.

    python .ci/dist_closure.py torch vespo

The closure is computed from the installed metadata (``importlib.metadata`` requirements, followed
recursively, environment markers evaluated, requested extras followed); pip, setuptools and wheel
(the venv's own tools) are always allowed. Used by .ci/install_checks.sh.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from pip._vendor.packaging.requirements import Requirement  # pip is in every venv; packaging may not be


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


DISTS = {norm(d.metadata["Name"]): d for d in md.distributions()}
TOOLS = {"pip", "setuptools", "wheel"}


def closure(root: str) -> set[str]:
    """``root`` and everything its requirements pull, with the extras each requirement asks for."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(norm(root), frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        if name not in DISTS:
            sys.exit(f"dist_closure: {name} is required but not installed")
        seen.add((name, extras))
        for line in DISTS[name].requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((norm(req.name), frozenset(req.extras)))
    return {name for name, _ in seen}


def main(roots: list[str]) -> int:
    allowed = set().union(*(closure(r) for r in roots))
    extra = sorted(set(DISTS) - allowed - TOOLS)
    print(f"{len(DISTS)} distributions installed; closure of {' + '.join(roots)}: {len(allowed)}")
    if extra:
        print(f"dist_closure: installed beyond that closure: {', '.join(extra)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["torch"]))
