"""The run folder: every file a run writes, and reading a finished run back.

A run folder (`--workdir`) holds
  .lock                      an exclusive flock while a process trains in it (`WorkdirLock`)
  history.jsonl              one line per epoch, appended as it happens (`History`)
  run.json                   what defines the run (`run_identity`): a rerun resumes only
                             the run it describes (`check_same_run`)
  metrics.json               written when training ends: the best validation epoch's
                             metrics, the config as run and where the data was (`write_result`)
  learning_curves.{csv,png}  the losses and the validation metric per epoch (fettle_jax/curves.py)
  checkpoints/latest, best   Orbax checkpoints (fettle_jax/checkpoint.py): the resumable
                             state, and the parameters of the best validation epoch
  tensorboard/               optional TensorBoard scalars (config.tensorboard)
A grid (fettle_jax/grid.py) gives each setting such a folder, `<workdir>/<setting name>/`,
and keeps each chunk's resumable state in `<workdir>/chunks/<id>/`.

Reading back (shared by `fettle_jax.recommend` and `fettle_jax.export`): problems with
metrics.json, the best checkpoint or the data folder are one-line `RunFolderError`s /
`DataError`s (both in `errors.REPORTED_ERRORS`). The tools run on one device (`config.mesh`
is replaced by 1 x 1); checkpoints restore onto any mesh. The best checkpoint holds
parameters only: a backbone whose `represent` reads its non-trainable state (LATTICE's
learned neighbours) gets that state rebuilt from the best parameters by its `epoch_start`
hook, with a printed note: it approximates the state evaluation saw (which was built from
the parameters at the start of the best epoch).
"""

import csv
import fcntl
import json
import os
from typing import Any, Dict, NamedTuple, Optional

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from data_pipeline import dataset as dataset_lib
from fettle_jax import curves
from fettle_jax.errors import (ConfigError, DataError, OtherRunError, WorkdirInUseError,
                               WorkdirWriteError)
from fettle_jax.types import Representations


# ------------------------------------------------------------------------------- paths
def metrics_path(run_dir: str) -> str:
  return os.path.join(run_dir, "metrics.json")


def history_path(run_dir: str) -> str:
  return os.path.join(run_dir, "history.jsonl")


def checkpoints_dir(run_dir: str) -> str:
  """The folder of the run's Orbax checkpoints (`latest/` and `best/` below it)."""
  return os.path.abspath(os.path.join(run_dir, "checkpoints"))


def best_checkpoint_dir(run_dir: str) -> str:
  return os.path.join(checkpoints_dir(run_dir), "best")


def curves_paths(run_dir: str):
  """(csv, png) of the learning curves."""
  return (os.path.join(run_dir, "learning_curves.csv"),
          os.path.join(run_dir, "learning_curves.png"))


def tensorboard_dir(run_dir: str) -> str:
  return os.path.join(run_dir, "tensorboard")


def setting_dir(grid_dir: str, name: str) -> str:
  """A grid setting's own run folder."""
  return os.path.join(grid_dir, name)


def chunks_dir(grid_dir: str) -> str:
  """Where a grid keeps its chunks' resumable states (one folder per chunk)."""
  return os.path.join(grid_dir, "chunks")


def chunk_dir(grid_dir: str, chunk_id: str) -> str:
  """A grid chunk's resumable state (its settings list and `checkpoints/latest`)."""
  return os.path.join(chunks_dir(grid_dir), chunk_id)


def finished(run_dir: str) -> bool:
  """Whether training in this folder has ended (metrics.json is written last)."""
  return os.path.exists(metrics_path(run_dir))


def run_file(run_dir: str) -> str:
  return os.path.join(run_dir, "run.json")


# ------------------------------------------------------------------ the run a folder holds
# What a resumed run may change: its schedule, logging, placement and speed-only shape
# hints. The data section is compared through the data's facts (a moved folder is the same
# data); every other field defines what is trained.
RESCHEDULABLE = frozenset({"max_epochs", "patience", "eval_every", "checkpoint_every_epochs",
                           "eval_batch_size", "tensorboard", "mesh", "fettle_shapes", "data"})


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def run_identity(config, facts: dict, exclude=()) -> dict:
  """What defines a run, flat ('fettle.beta': value, 'data:n_items': value): the config's
  fields but the reschedulable ones, of its sections only its backbone's and alignment's,
  and the data's facts but their path; `exclude`: keys a grid sets per setting."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  read = {config.get("model"), config.get("alignment")}
  kept = {k: v for k, v in config.items()
          if k not in RESCHEDULABLE and (not isinstance(v, dict) or k in read)}
  identity = _flatten(kept)
  identity.update({f"data:{k}": v for k, v in facts.items() if k != "path"})
  for key in exclude:
    identity.pop(key, None)
  return json.loads(json.dumps(identity, sort_keys=True, default=str))  # tuples -> lists


def check_same_run(run_dir: str, identity: dict, resumable: bool) -> None:
  """Records `identity` in <run_dir>/run.json, or stops with OtherRunError when the folder
  holds something to resume (`resumable`) of a run that differs in a field both know: a
  rerun would otherwise continue another config's checkpoint (or keep its metrics) as if
  it were this one. Folders from before run.json are compared through metrics.json."""
  held = None
  if resumable and os.path.exists(run_file(run_dir)):
    try:
      with open(run_file(run_dir)) as f:
        held = json.load(f)
    except (OSError, json.JSONDecodeError):
      held = None  # cut short by a kill: rewritten below
  elif resumable and finished(run_dir):
    try:
      with open(metrics_path(run_dir)) as f:
        metrics = json.load(f)
      held = run_identity(metrics["config"], metrics.get("data") or {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
      held = None
  if held is not None:
    differ = sorted(k for k in held.keys() & identity.keys() if held[k] != identity[k])
    if differ:
      shown = "; ".join(f"{k} {held[k]!r} there, {identity[k]!r} here" for k in differ[:4])
      more = f"; {len(differ) - 4} more" if len(differ) > 4 else ""
      raise OtherRunError(f"{run_dir}: holds a run of another config ({shown}{more}); pass "
                          "another --workdir, or rerun with that run's config to resume it")
    if os.path.exists(run_file(run_dir)):
      return
  try:
    temporary = run_file(run_dir) + ".tmp"
    with open(temporary, "w") as f:
      json.dump(identity, f, indent=1, sort_keys=True)
    os.replace(temporary, run_file(run_dir))
  except OSError as e:
    raise WorkdirWriteError(f"{run_file(run_dir)}: cannot write ({e.strerror})") from e


# ------------------------------------------------------------------------------ writing
class WorkdirLock:
  """An exclusive flock on <workdir>/.lock for the run's lifetime: a second process on the
  same workdir stops with an error instead of interleaving checkpoints. The kernel drops
  the lock when the holder dies (SIGKILL included), so no stale lock survives a crash."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "?"
      self._file.close()
      raise WorkdirInUseError(f"{workdir}: in use by another run (pid {holder}); wait for it "
                              "or pass another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


class History:
  """<workdir>/history.jsonl: one line per epoch, appended as it happens (a crashed run
  keeps its curve); on resume, lines past the restored epoch are dropped (they re-run)."""

  def __init__(self, workdir: str, restored_epoch: int):
    self.path = history_path(workdir)
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          if record.get("epoch", 0) <= restored_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(self.path, "w") as f:
      f.writelines(kept)

  def append(self, record: dict) -> None:
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      raise WorkdirWriteError(f"{self.path}: cannot append epoch {record.get('epoch')} "
                              f"({e.strerror}); free space and rerun to resume") from e


def write_result(workdir: str, result: dict) -> None:
  """metrics.json and the learning curves next to it."""
  with open(metrics_path(workdir), "w") as f:
    json.dump(result, f, indent=2, default=str)
  write_curves(workdir, result)


def write_curves(workdir: str, result: dict) -> None:
  """<workdir>/learning_curves.{csv,png} from a run's result; any failure (matplotlib
  missing, a full disk, ...) is one logged note, never an exception: the run has finished."""
  history = result.get("history") or []
  csv_path, png_path = curves_paths(workdir)
  try:
    curves.write_csv(csv_path, history)
    config = result.get("config") or {}
    title = (f"{config.get('model', '?')}, alignment {config.get('alignment', '?')}, on "
             f"{(result.get('data') or {}).get('name', '?')}: best epoch "
             f"{result.get('best_epoch')} of {result.get('epochs')}")
    curves.plot(png_path, history, result.get("best_epoch"), title)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("note: learning curves not written (%s: %s)", type(e).__name__,
                    str(e).strip().splitlines()[0] if str(e).strip() else "")


# ------------------------------------------------------------------------- reading back
class RunFolderError(ConfigError):
  """A --workdir or tool flag these tools cannot use; the message says what to do."""


class Run(NamedTuple):
  workdir: str
  metrics: dict                      # metrics.json as written by train_and_evaluate
  experiment: Any                    # train.Experiment: config, backbone, static inputs, ...
  data: dataset_lib.Dataset
  params: Any                        # the best-validation parameters {"backbone", "alignment"}
  model_state: Any                   # the backbone's non-trainable state for `represent`


def _tuples(value):
  """JSON turned the config's tuples into lists; ConfigDict fields want them back."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_metrics(workdir: str) -> dict:
  if not os.path.isdir(workdir):
    raise RunFolderError(f"{workdir}: no such run folder (pass the --workdir of a finished "
                         "`python run.py` run)")
  path = metrics_path(workdir)
  if not os.path.exists(path):
    raise RunFolderError(f"{path}: not found; the run has not finished (rerun `python run.py "
                         f"--workdir={workdir}` with its config to resume and finish it)")
  try:
    with open(path) as f:
      metrics = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RunFolderError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(metrics, dict) or not all(k in metrics for k in ("config", "data")):
    raise RunFolderError(f"{path}: has no 'config' and 'data' entries (written by an older "
                         "version of run.py?)")
  return metrics


def run_config(metrics: dict) -> ml_collections.ConfigDict:
  """The ConfigDict the run trained with (data-derived settings included), on one device."""
  config = ml_collections.ConfigDict(_tuples(metrics["config"]))
  config.mesh = ml_collections.ConfigDict({"data": 1, "model": 1})
  return config


def load_run_data(metrics: dict, config: ml_collections.ConfigDict, workdir: str,
                  data_path: Optional[str] = None) -> dataset_lib.Dataset:
  """The run's data set (from metrics.json's path, or `data_path`), checked to be the same
  one: a moved folder or other data is a one-line error, not a wrong answer."""
  facts = metrics["data"]
  path = data_path or facts["path"]
  if not os.path.isdir(path):
    raise RunFolderError(f"{path}: the data folder of {workdir} (metrics.json) does not exist; "
                         "if it moved, pass --data=NEW_FOLDER")
  modalities = config.data.modalities
  data = dataset_lib.load_dataset(path, name=facts.get("name") or None,
                                  modalities=list(modalities) if modalities is not None else None)
  found = {"n_users": data.n_users, "n_items": data.n_items, "n_train": len(data.train),
           "n_valid": len(data.valid), "n_test": len(data.test)}
  differ = [f"{k} {facts[k]} != {v}" for k, v in found.items() if k in facts and facts[k] != v]
  if differ:
    raise RunFolderError(f"{path}: not the data {workdir} was trained on (run vs folder: "
                         f"{', '.join(differ)})")
  return data


def load_run(workdir: str, data_path: Optional[str] = None) -> Run:
  """Reopens a finished run: config and data from metrics.json, the backbone assembled as
  in training (`train.create_train_state`), the best checkpoint's parameters."""
  # Imported here: training writes run folders through this module.
  from fettle_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from fettle_jax import train  # pylint: disable=g-import-not-at-top
  metrics = read_metrics(workdir)
  best = best_checkpoint_dir(workdir)
  if not os.path.isdir(best) or not any(name.isdigit() for name in os.listdir(best)):
    raise RunFolderError(f"{best}: no best checkpoint (the run trained no epoch, or its "
                         "checkpoints were removed)")
  config = run_config(metrics)
  data = load_run_data(metrics, config, workdir, data_path)
  config.data.path, config.data.prepare = data.path, ""  # never re-prepare: use this folder
  experiment = train.create_train_state(config, data)
  checkpoints = checkpoint_lib.Checkpoints(workdir, experiment.layout.state)
  try:
    params, model_state = checkpoints.restore_best()
  except Exception as e:  # pylint: disable=broad-except  # torn/corrupt/mismatched: one line
    first = (str(e).strip().splitlines() or [""])[0]
    raise RunFolderError(f"{best}: cannot restore the best parameters "
                         f"({type(e).__name__}: {first})") from None
  finally:
    checkpoints.close()
  if model_state is None:  # the backbone keeps no state (or none its ranking reads)
    model_state = experiment.state.model_state
  return Run(workdir, metrics, experiment, data, params, model_state)


def represent(run: Run) -> Representations:
  """The backbone's representations of every user and item under the best parameters."""
  experiment = run.experiment
  fn = jax.jit(lambda p, s, st: experiment.backbone.represent(p, s, st, experiment.config))
  return fn(run.params["backbone"], run.model_state, experiment.static)


# ------------------------------------------------------------------------- original ids
# Files that map the data set's ids (0..n-1) back to the ids they were made from:
# (user file, item file, format). The first pair found in the folder is used.
ID_FILES = (
    ("users.csv", "items.csv", "prepared"),             # data_pipeline.prepare (ml100k)
    ("u_id_mapping.csv", "i_id_mapping.csv", "mmrec"),  # MMRec's preprocessing
    ("user_ids.txt", "item_ids.txt", "lines"),          # data_pipeline.convert --remap
    ("user2id.json", "item2id.json", "json"),           # LATTICE
)


def _read_ids(file: str, kind: str, what: str, n: int) -> np.ndarray:
  """Original id (as text) of each id 0..n-1; DataError if the file does not cover them."""
  names = {}
  with open(file, encoding="utf-8", newline="") as f:
    if kind == "lines":
      for k, line in enumerate(f.read().splitlines()):
        names[k] = line.strip()
    elif kind == "json":
      for original, k in json.load(f).items():
        names[int(k)] = str(original)
    else:
      first = f.readline()
      f.seek(0)
      rows = csv.DictReader(f, delimiter="\t" if "\t" in first else ",")
      header = rows.fieldnames or []
      if kind == "prepared":  # user_id, raw_user_id
        new, old = f"{what}_id", f"raw_{what}_id"
      else:  # MMRec: userID / itemID is the new id, the other column the original
        new = "userID" if what == "user" else "itemID"
        others = [c for c in header if c != new]
        old = others[0] if others else None
      if new not in header or old not in header:
        raise DataError(f"{file}: expected columns {new!r} and an original id, got {header}")
      for row in rows:
        names[int(row[new])] = row[old]
  missing = [k for k in range(n) if k not in names]
  if missing:
    raise DataError(f"{file}: no original id for {what} {missing[0]} ({len(missing)} of {n} "
                    "missing)")
  return np.array([names[k] for k in range(n)], dtype=object)


def original_ids(path: str, n_users: int, n_items: int) -> Optional[Dict[str, Any]]:
  """{"users": [n_users], "items": [n_items], "files": (user file, item file)} of original
  ids from the folder's mapping files, or None when it has none. An unreadable mapping is
  reported as one `note:` line and left out (it is optional; the ranking does not need it)."""
  for user_file, item_file, kind in ID_FILES:
    files = (os.path.join(path, user_file), os.path.join(path, item_file))
    if not all(os.path.exists(f) for f in files):
      continue
    try:
      return {"users": _read_ids(files[0], kind, "user", n_users),
              "items": _read_ids(files[1], kind, "item", n_items), "files": files}
    except (DataError, OSError, ValueError, KeyError, UnicodeDecodeError) as e:
      print(f"note: original ids left out: {e}", flush=True)
      return None
  return None


# ------------------------------------------------------------------------- command lines
def define_run_flags(flag_values) -> None:
  """--workdir, --data and --compilation_cache: what every after-training tool reads."""
  flags.DEFINE_string("workdir", None, "Run folder of a finished `python run.py` run.",
                      flag_values=flag_values)
  flags.DEFINE_string("data", None, "Data folder, if it moved since training (default: the "
                      "path in <workdir>/metrics.json).", flag_values=flag_values)
  flags.DEFINE_string("compilation_cache", "", "As run.py's: '' = the default cache, "
                      "'none' = off.", flag_values=flag_values)


def parse_flags(flag_values, argv, doc: str, required=("workdir",)) -> bool:
  """Parses a tool's own absl FlagValues; False after printing --help. A bad or missing
  flag is one `error:` line and exit status 1 (SystemExit). Every call starts from the
  defaults (a second call in one process does not inherit the first one's values)."""
  if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(), flush=True)
    return False
  flag_values.unparse_flags()
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    raise SystemExit(f"error: {e}") from None
  if len(rest) > 1:
    raise SystemExit(f"error: unexpected arguments {rest[1:]}")
  missing = [f"--{name}" for name in required if not flag_values[name].value]
  if missing:
    raise SystemExit(f"error: {' and '.join(missing)} required (see --help)")
  return True
