"""Property-based: any list of --config overrides (field names near real ones, random
nesting, values of every type) either gives a config that trains, or is refused with one
line by the checks run.py makes before a run folder exists; never a traceback. Hypothesis
picks the overrides; most are refused in-process in microseconds, the first few accepted
ones are trained (one epoch on the tiny data set)."""

import os
import string
import time

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import pytest

from fettle_jax import config_check
from fettle_jax import train
from fettle_jax.errors import REPORTED_ERRORS
from tests.conftest import ROOT

# Cases, and accepted configs trained per test run (the others are only checked); raise
# them (FETTLE_FUZZ_EXAMPLES, FETTLE_FUZZ_TRAINED) to explore further.
EXAMPLES = int(os.environ.get("FETTLE_FUZZ_EXAMPLES", 400))
TRAINED_RUNS = int(os.environ.get("FETTLE_FUZZ_TRAINED", 2))

# Every field and section of the config the test overrides (configs/base.py + tiny data).
_BASE = config_check.load_config_file(os.path.join(ROOT, "configs", "base.py"))
_FIELDS = config_check.field_paths(_BASE)
_NAME_CHARS = string.ascii_lowercase + "_"


def mutated(name: str, draw) -> str:
  """`name` with one typo: a character dropped, doubled, swapped or replaced."""
  if not name:
    return "x"
  index = draw(st.integers(0, len(name) - 1))
  how = draw(st.sampled_from(["drop", "double", "swap", "replace"]))
  if how == "drop":
    return name[:index] + name[index + 1:]
  if how == "double":
    return name[:index] + name[index] + name[index:]
  if how == "swap" and index + 1 < len(name):
    return name[:index] + name[index + 1] + name[index] + name[index + 2:]
  return name[:index] + draw(st.sampled_from(_NAME_CHARS)) + name[index + 1:]


@st.composite
def field_names(draw):
  """A real field, a typo of one, a real section with a made-up field, a value used as a
  section, a made-up path, or something that is not a name at all."""
  real = draw(st.sampled_from(_FIELDS))
  kind = draw(st.sampled_from(["real", "real", "real", "typo", "new_leaf", "deeper",
                               "invented", "odd"]))
  event(f"name: {kind}")
  if kind == "real":
    return real
  if kind == "typo":
    parts = real.split(".")
    position = draw(st.integers(0, len(parts) - 1))
    parts[position] = mutated(parts[position], draw)
    return ".".join(parts)
  word = draw(st.text(_NAME_CHARS, min_size=1, max_size=8))
  if kind == "new_leaf":
    return f"{real.rsplit('.', 1)[0]}.{word}" if "." in real else word
  if kind == "deeper":
    return f"{real}.{word}"
  if kind == "invented":
    return ".".join(draw(st.lists(st.text(_NAME_CHARS, min_size=1, max_size=6), min_size=1,
                                  max_size=3)))
  return draw(st.sampled_from(["", ".", "a..b", "1x", "a-b", "fettle.", ".seed", "a b",
                               "fettle.alpha=1"]))


_VALUES = st.one_of(
    st.integers(-3, 300).map(str),
    st.sampled_from(["0", "1", "-1", "2", "0x10", "1_0", "1e-3", "0.5", "-0.0", "1e400",
                     "nan", "inf", "-inf", "true", "false", "True", "t", "None", "none",
                     "", " ", "()", "(5,)", "5,10", "(5, 10, 20)", "[1, 2]", "5,,10", "a,b",
                     "image,text", "'text'", "{}", "{'a': 1}", "recall@20", "ndcg@5",
                     "precision@7", "fettle", "bm3", "none", "lightgcn", "bpr", "freedom",
                     "dot", "cosine", "pairwise", "topmost", "batch", "all", "kg",
                     "data/baby", "ml100k"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12))


def field_type(field: str):
  """The type of a real leaf field of the base config, None for anything else."""
  if field not in _FIELDS:
    return None
  node = _BASE
  for part in field.split(".")[:-1]:
    node = node[part]
  name = field.rsplit(".", 1)[-1]
  return None if hasattr(node[name], "keys") else node.get_type(name)


def typed_values(kind):
  """Values of the field's own type (so that some lists pass and train)."""
  if kind is bool:
    return st.sampled_from(["true", "false", "1", "0"])
  if kind is int:
    return st.integers(-2, 64).map(str)
  if kind is float:
    return st.sampled_from(["0", "1e-4", "1e-3", "0.1", "0.5", "1", "2", "-1"])
  if kind is tuple:
    return st.sampled_from(["5,10", "(5, 10, 20)", "text", "image,text", "None"])
  return st.sampled_from(["fettle", "bm3", "none", "lightgcn", "bpr", "vbpr", "recall@20",
                          "ndcg@10", "dot", "cosine", "pairwise", "batch", "all", ""])


@st.composite
def overrides(draw):
  """One to three `--config...` arguments: `--config.F=V`, a bare `--config.F`, or
  `--noconfig.F`."""
  arguments = []
  for _ in range(draw(st.integers(1, 3))):
    field = draw(field_names())
    form = draw(st.sampled_from(["value", "value", "value", "value", "bare", "negated"]))
    if form == "value":
      kind = field_type(field)
      typed = kind is not None and draw(st.booleans())
      value = draw(typed_values(kind) if typed else _VALUES)
      arguments.append(f"--config.{field}={value}")
    elif form == "bare":
      arguments.append(f"--config.{field}")
    else:
      arguments.append(f"--noconfig.{field}")
  return arguments


def effective_settings(config) -> str:
  """What decides the run: every shared field and the sections of the backbone and the
  alignment in use (other sections are never read)."""
  shared = {k: config[k] for k in config.keys() if not hasattr(config[k], "keys")}
  sections = {k: config[k].to_dict() for k in ("data", "mesh", config.model, config.alignment)
              if k in config}
  return repr((sorted(shared.items()), sorted(sections.items())))


def checked_config(arguments, config_file, n_items):
  """The config run.py would train, or the one-line message of its refusal (run.py's
  checks in its order: command line, then the device-dependent ones, then the data's)."""
  try:
    config, _, _ = config_check.config_from_command_line(
        ["run.py", f"--config={config_file}", *arguments], "default")
    train.check_config(config)
    train.check_config_for_data(config, n_items)
  except REPORTED_ERRORS as e:
    return None, str(e)
  return config, None


@pytest.fixture
def tiny_config_file(tiny_mmrec, tmp_path):
  path = tmp_path / "tiny_config.py"
  path.write_text(
      "from tests.conftest import tiny_config\n\n"
      "def get_config():\n"
      f"  config = tiny_config({tiny_mmrec!r}, model='lightgcn')\n"
      "  config.max_epochs = 1\n"
      "  return config\n")
  return str(path)


def test_any_overrides_train_or_are_refused_in_one_line(tiny_config_file, tmp_path):
  outcomes = {"refused": 0, "accepted": 0, "trained": 0}
  trained = set()  # effective settings trained already (each is trained once)
  started = time.time()

  @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck))
  @given(arguments=overrides())
  def check(arguments):
    config, refusal = checked_config(arguments, tiny_config_file, n_items=30)
    if refusal is not None:
      outcomes["refused"] += 1
      event("refused")
      assert refusal and "\n" not in refusal, (arguments, refusal)
      return
    outcomes["accepted"] += 1
    event("accepted")
    config.unlock()
    config.max_epochs = min(config.max_epochs, 1)  # the property is about the config
    settings_key = effective_settings(config)
    if outcomes["trained"] >= TRAINED_RUNS or settings_key in trained:
      return
    outcomes["trained"] += 1
    trained.add(settings_key)
    event(f"trained {config.model} + {config.alignment}")
    workdir = str(tmp_path / f"run{outcomes['trained']}")
    try:
      result = train.train_and_evaluate(config, workdir)
    except REPORTED_ERRORS as e:  # a mistake only the training finds: still one line
      assert "\n" not in str(e), (arguments, str(e))
      return
    assert result["epochs"] == config.max_epochs, arguments

  check()  # pylint: disable=no-value-for-parameter
  print(f"\nconfig overrides: {outcomes['refused'] + outcomes['accepted']} cases "
        f"({outcomes['refused']} refused, {outcomes['accepted']} accepted, "
        f"{outcomes['trained']} of them trained) in {time.time() - started:.1f} s")
  assert outcomes["refused"] > EXAMPLES // 4 and outcomes["trained"] == TRAINED_RUNS
