"""The command line on a partial install: one line naming the extra, exit code 2."""

from __future__ import annotations

import importlib.util

import pytest

from vespo import cli


@pytest.mark.parametrize("argv", [["train"], ["eval", "runs/x"], ["plot", "runs/x"], ["kernels"], ["warmup"]])
def test_trainer_commands_without_the_train_extra_name_it(monkeypatch, capsys, argv):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "pydantic" else real(name, *a)
    )
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "vespo[train]" in err[0] and "pydantic" in err[0]


def losses_on_the_base_install(monkeypatch, capsys) -> str:
    """What ``vespo losses`` prints when none of the train extra's modules can be found."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name in cli.TRAIN_MODULES else real(name, *a)
    )
    assert cli.main(["losses"]) == 0
    return capsys.readouterr().out


def test_losses_runs_on_the_base_install(monkeypatch, capsys):
    out = losses_on_the_base_install(monkeypatch, capsys)
    assert "vespo (sequence)" in out and "k_pos=2.0" in out


def test_losses_shows_a_range_only_where_a_number_has_one(monkeypatch, capsys):
    """Flags show their two values and objects no range; no '(-inf, inf)' for a non-number."""
    out = losses_on_the_base_install(monkeypatch, capsys)
    assert "per_sign=False {True, False}" in out and "tau=0.95 [0, 1)" in out
    assert "batch_stats=None" in out and "None (-inf" not in out and "False (-inf" not in out
