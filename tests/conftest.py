"""Shared test fixtures: tiny data sets written in the on-disk formats users have."""

import importlib.util
import os
import sys

import numpy as np
import pytest

# The suite compiles hundreds of small programs (and, eagerly, every op outside a jit) and
# runs each on tiny data, so compile time is most of its wall time. Two XLA:CPU settings cut
# it; neither changes float semantics (no fast-math), and run.py and the scripts keep XLA's
# defaults, which run faster once compiled:
# - LLVM optimization level 0: a tiny FETTLE epoch compiles ~1.7x faster;
# - the legacy loop emitters instead of the MLIR fusion emitters: 31-32 -> 17-21 ms to
#   compile one eager op, the suite ~1.4x faster, but
#   the compiled ml100k BPR+FETTLE step 1.3-1.5x slower (scripts/benchmark_steps.py;
#   FREEDOM+FETTLE within the noise), hence tests only.
# Set before JAX starts (child processes of the tests inherit them); a value the caller set
# wins.
_TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f"--{flag}={value}" for flag, value in _TEST_XLA_FLAGS.items()
       if flag not in os.environ.get("XLA_FLAGS", "")]).strip()

# The checkout is first on sys.path through setup.cfg's `pythonpath = .` (pytest >= 7).
from data_pipeline import mmrec_writer  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**overrides) -> dict:
  """os.environ with the checkout first on PYTHONPATH, for child Pythons: they do not get
  pytest's sys.path, and would otherwise import an installed copy of the packages."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, **overrides)


def load_script(name: str):
  """scripts/<name>.py as a module (scripts/ is a folder of programs, not a package),
  loaded once per process."""
  key = f"{name}_script"
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "scripts",
                                                                    f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


def pytest_ignore_collect(collection_path, config):
  """tests/multidevice needs 8 CPU devices, which must be set before JAX starts: it runs in
  its own pytest process (`python -m pytest -q tests/multidevice`), not inside this one."""
  if collection_path.name == "multidevice":
    return not any("multidevice" in str(arg) for arg in config.args)
  return None


def make_interactions(n_users=40, n_items=30, per_user=8, seed=0):
  """Random (user, item, split) triples: every user has train, valid and test items."""
  rng = np.random.default_rng(seed)
  users, items, labels = [], [], []
  for u in range(n_users):
    chosen = rng.choice(n_items, size=per_user, replace=False)
    split = np.zeros(per_user, int)
    split[-2], split[-1] = 1, 2
    users += [u] * per_user
    items += chosen.tolist()
    labels += split.tolist()
  return np.array(users), np.array(items), np.array(labels)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session: tests that build the same programs (the tiny
  configs recur) compile them once."""
  from fettle_jax import train  # pylint: disable=g-import-not-at-top
  # Under pytest-xdist the workers share one cache (their base temps are siblings).
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  return train.enable_compilation_cache(str(root / "xla_cache"))


@pytest.fixture
def tiny_mmrec(tmp_path):
  """A tiny MMRec-format folder with image and text features; returns its path."""
  users, items, labels = make_interactions()
  rng = np.random.default_rng(1)
  features = {"image": rng.normal(size=(30, 12)).astype(np.float32),
              "text": rng.normal(size=(30, 6)).astype(np.float32)}
  path = str(tmp_path / "tiny")
  mmrec_writer.write_mmrec(path, "tiny", users, items, labels, features)
  return path


def tiny_config(path, model="lightgcn", alignment="none", config=None):
  """A fast config on the tiny data set (from `config`, default configs/base.py)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  if config is None:
    config = base.get_config(model)
  config.alignment = alignment
  config.data.path = path
  config.batch_size = 64
  config.eval_batch_size = 16
  config.max_epochs = 4
  config.checkpoint_every_epochs = 2
  config.embedding_size = 8
  config.topk = (5, 10, 20)
  config.fettle.prototypes_item = 16
  config.fettle.prototypes_user = 16
  return config


def assert_sane_run(result, n_epochs: int, aligned: bool) -> None:
  """A finished tiny run: every epoch ran, every loss is finite, an alignment plug-in
  contributed a non-zero loss, every metric lies in [0, 1]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert result["epochs"] == n_epochs
  for record in result["history"]:
    assert all(np.isfinite(v) for k, v in record.items() if "loss" in k), record
    if aligned:
      assert record["alignment_loss"] != 0, record
  for split in ("valid", "test"):
    for name, value in result[split].items():
      assert 0.0 <= value <= 1.0, (split, name, value)
