"""Shared test setup: the tests folder mirrors the package (tests/losses, tests/rollout, ...).

``tiny_run.py`` beside this file holds the overrides that make a training run take seconds and the
reward functions the end-to-end tests name in configs (``task.reward_fn=tiny_run:...``); it must
be importable by that name here and in reward worker processes, so this folder goes on sys.path.
Tests that start a Ray instance are marked ``ray`` (``pytest -m "not ray"`` skips them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# reward worker processes import ``tiny_run`` by name too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tiny_run import TINY_RUN  # noqa: E402

RAY_MODULES = {"test_async.py", "test_ray_cluster.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in RAY_MODULES or "async" in item.name:
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def tiny_run_overrides() -> list[str]:
    """Overrides of a seconds-long run: tiny model, short responses, no warm-up, no progress bar."""
    return [*TINY_RUN, "logging.progress=false", "warmup.steps=0", "run.threads=1"]


@pytest.fixture
def tiny_run_config(tmp_path: Path, tiny_run_overrides: list[str]) -> Callable[..., object]:
    """``tiny_run_config(*overrides)``: a validated TrainConfig of a tiny run under ``tmp_path``."""
    from vespo.train.config import load_config

    def make(*extra: str, out: Path | None = None):
        return load_config(None, [*tiny_run_overrides, f"run.out_dir={out or tmp_path / 'run'}", *extra])

    return make
