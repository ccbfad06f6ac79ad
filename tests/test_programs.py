"""The traced-program cache (fettle_jax/programs.py): a rerun loads the epoch and
evaluation programs instead of tracing them, and trains exactly as a traced run; a cache
file is data only (a planted pickle never runs), and a fresh cache folder is private."""

import glob
import os
import pickle
import stat
import typing

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
                    for p in glob.glob(str(tmp_path / "programs" / "*.program")))
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


class _WritesMarker:
  """Unpickling this runs `open(marker, 'w')`: what a planted pickle would do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_with_one_warning_and_never_runs(tiny_mmrec, tmp_path,
                                                                     capfd, program_cache):
  config = lightgcn_config(tiny_mmrec, "fettle")
  stored = train.train_and_evaluate(config, str(tmp_path / "stored"))
  entries = glob.glob(os.path.join(program_cache, "*.program"))
  assert len(entries) == 2
  marker = tmp_path / "marker"
  for path in entries:  # the attack on the pickle format: each entry a hostile pickle
    with open(path, "wb") as f:
      pickle.dump({"format": 2, "exported": _WritesMarker(str(marker))}, f)
  capfd.readouterr()
  tampered = train.train_and_evaluate(config, str(tmp_path / "tampered"))
  warnings = [line for line in capfd.readouterr().err.splitlines() if "program cache" in line]
  assert len(warnings) == 2 and all("unreadable" in w and "tracing again" in w
                                    for w in warnings), warnings  # one per entry
  assert not marker.exists()
  assert same_run(stored, tampered)
  for path in entries:  # traced again and stored again, as data
    with open(path, "rb") as f:
      assert f.readline().startswith(b'{"format": 2')


def test_a_fresh_cache_folder_and_its_files_are_private(tiny_mmrec, tmp_path):
  directory = str(tmp_path / "fresh" / "xla")
  assert programs.private_directory(directory) == directory
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
  shared = tmp_path / "shared"
  shared.mkdir(mode=0o775)
  os.chmod(shared, 0o775)
  programs.private_directory(str(shared))  # a folder the user chose keeps its mode
  assert stat.S_IMODE(os.stat(shared).st_mode) == 0o775
  programs.enable(os.path.join(directory, "programs"))
  try:
    train.train_and_evaluate(lightgcn_config(tiny_mmrec, "none"), str(tmp_path / "run"))
  finally:
    programs.disable()
  assert stat.S_IMODE(os.stat(os.path.join(directory, "programs")).st_mode) == 0o700
  for path in glob.glob(os.path.join(directory, "programs", "*")):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


class _Pair(typing.NamedTuple):
  left: typing.Any
  right: typing.Any


def test_tree_descriptions_round_trip_and_refuse_what_they_cannot_name():
  tree = jax.tree_util.tree_structure(
      (_Pair({"b": 1, "a": [2, None]}, (3,)), {0: 4}, [], None, 5))
  description = programs.describe_tree(tree)
  assert programs.rebuild_tree(description) == tree
  assert programs.rebuild_tree(programs.describe_tree(jax.tree_util.tree_structure(1))) == (
      jax.tree_util.tree_structure(1))
  # Only classes already loaded are named: no file can make the reader import a module.
  with pytest.raises(ValueError, match="not loaded"):
    programs.rebuild_tree({"namedtuple": ["no_such_module_xyz", "T"], "fields": []})
  with pytest.raises(ValueError, match="not a NamedTuple"):
    programs.rebuild_tree({"namedtuple": ["os", "system"], "fields": []})
  with pytest.raises(ValueError, match="bad tree description"):
    programs.rebuild_tree({"eval": "1"})
