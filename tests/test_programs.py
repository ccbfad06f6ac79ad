"""The traced-program cache (fettle_jax/programs.py): a rerun loads the epoch and
evaluation programs instead of tracing them, and trains exactly as a traced run."""

import glob
import os

import jax
import numpy as np
import pytest

from fettle_jax import programs
from fettle_jax import train
from tests.conftest import tiny_config


@pytest.fixture
def program_cache(tmp_path):
  directory = programs.enable(str(tmp_path / "programs"))
  yield directory
  programs.disable()


def lightgcn_config(path, alignment):
  # LightGCN's CSR products are custom calls without export guarantees: they must pass.
  config = tiny_config(path, model="lightgcn", alignment=alignment)
  config.max_epochs = 2
  return config


def same_run(a, b):
  return a["history"] == b["history"] and a["test"] == b["test"] and a["valid"] == b["valid"]


def test_rerun_loads_the_programs_and_trains_as_a_traced_run(tiny_mmrec, tmp_path,
                                                             monkeypatch):
  config = lightgcn_config(tiny_mmrec, "fettle")
  plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
  programs.enable(str(tmp_path / "programs"))
  try:
    first = train.train_and_evaluate(config, str(tmp_path / "first"))
    stored = sorted(os.path.basename(p).split("-")[0]
                    for p in glob.glob(str(tmp_path / "programs" / "*.exported")))
    assert stored == ["epoch", "evaluate"]  # one program each, reused by every epoch

    def no_tracing(*args, **kwargs):
      raise AssertionError("a stored program was traced again")
    monkeypatch.setattr(programs, "_flat_program", no_tracing)
    second = train.train_and_evaluate(config, str(tmp_path / "second"))
  finally:
    programs.disable()
  assert same_run(plain, first) and same_run(first, second)


def test_unreadable_or_unexportable_programs_fall_back_to_tracing(tiny_mmrec, tmp_path,
                                                                  capfd, monkeypatch,
                                                                  program_cache):
  config = lightgcn_config(tiny_mmrec, "none")
  # Export refuses the CSR custom calls: a warning, then the traced program runs.
  monkeypatch.setattr(programs, "_EXPORT_CHECKS", [])
  refused = train.train_and_evaluate(config, str(tmp_path / "refused"))
  assert "epoch not stored" in capfd.readouterr().err
  assert not glob.glob(os.path.join(program_cache, "epoch-*"))
  monkeypatch.undo()
  stored = train.train_and_evaluate(config, str(tmp_path / "stored"))
  (path,) = glob.glob(os.path.join(program_cache, "epoch-*"))
  with open(path, "wb") as f:
    f.write(b"torn")
  rewritten = train.train_and_evaluate(config, str(tmp_path / "rewritten"))
  assert "unreadable" in capfd.readouterr().err
  assert programs._load(path)[0] is not None  # pylint: disable=protected-access
  assert same_run(refused, stored) and same_run(stored, rewritten)


def test_key_follows_the_description_the_source_and_the_placement(monkeypatch):
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  x = jax.device_put(np.zeros((4, 2), np.float32),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model")))
  replicated = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  leaves, tree = jax.tree_util.tree_flatten({"x": x})
  key = programs.program_key("epoch", "config a", leaves, tree)
  # Equivalent placements (what a program's outputs come back as) keep the key.
  assert programs.program_key("epoch", "config a", [replicated], tree) == key
  assert programs.program_key("epoch", "config b", leaves, tree) != key
  assert programs.program_key("evaluate", "config a", leaves, tree) != key
  assert programs.program_key("epoch", "config a", [x.astype(np.float16)], tree) != key
  assert programs.program_key("epoch", "config a", [x, x],
                              jax.tree_util.tree_structure((0, 0))) != key
  monkeypatch.setattr(programs, "_source_digest", lambda: "edited")
  assert programs.program_key("epoch", "config a", leaves, tree) != key
