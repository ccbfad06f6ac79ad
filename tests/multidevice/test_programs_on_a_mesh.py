"""The traced-program cache on a 2 x 4 mesh: stored and loaded programs keep the layout's
shardings and train exactly as the traced run."""

import jax
import pytest

from fettle_jax import programs
from fettle_jax import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def test_stored_programs_on_a_2x4_mesh_train_as_traced(tiny_mmrec, tmp_path, monkeypatch):
  config = tiny_config(tiny_mmrec, model="lightgcn", alignment="fettle")
  config.mesh.data, config.mesh.model = 2, 4
  config.max_epochs = 2
  plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
  programs.enable(str(tmp_path / "programs"))
  try:
    first = train.train_and_evaluate(config, str(tmp_path / "first"))
    monkeypatch.setattr(programs, "_flat_program", None)  # a second trace would fail
    second = train.train_and_evaluate(config, str(tmp_path / "second"))
  finally:
    programs.disable()
  for run in (first, second):
    assert run["history"] == plain["history"]
    assert run["test"] == plain["test"] and run["valid"] == plain["valid"]
