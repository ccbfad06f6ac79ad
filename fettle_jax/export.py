"""Exports a finished run's embeddings (best-validation parameters) as .npy files.

  fettle-export --workdir=runs/default --out=embeddings/ [--data=DIR]
  (or: python -m fettle_jax.export ...)

Writes the backbone's `Representations` under the best parameters: `users.npy`
[n_users, L], `items.npy` [n_items, L] (the final representations scores are inner
products of) and `items_<modality>.npy` [n_items, L] for each modality item embedding the
backbone has (projections materialized; none for collaborative-filtering backbones), plus
a README.md stating each file's shape, dtype and what its rows are.
"""

import os
import sys

from absl import flags
from absl import logging
import jax
import numpy as np

from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import REPORTED_ERRORS
from fettle_jax.types import ProjectedRows


def embeddings(run: workdir_lib.Run) -> dict:
  """{file name: host array}: users, items, items_<modality> of the best parameters."""
  reps = workdir_lib.represent(run)
  out = {"users.npy": reps.users, "items.npy": reps.items}
  for name, table in sorted(reps.modality_items.items()):
    out[f"items_{name}.npy"] = (jax.jit(ProjectedRows.materialize)(table)
                                if isinstance(table, ProjectedRows) else table)
  return {name: np.asarray(jax.device_get(array)) for name, array in out.items()}


def readme(run: workdir_lib.Run, arrays: dict, original) -> str:
  data, metrics = run.data, run.metrics
  config = run.experiment.config
  lines = [
      f"# Embeddings of {os.path.abspath(run.workdir)}",
      "",
      f"Backbone `{config.model}`, alignment `{config.alignment}`; parameters of the best "
      f"validation epoch {metrics.get('best_epoch')} of {metrics.get('epochs')} (test "
      f"recall@20 {metrics.get('test', {}).get('recall@20', float('nan')):.4f}), written by "
      "`python -m fettle_jax.export`.",
      f"Data: `{data.path}` ({data.n_users} users, {data.n_items} items). Row r is the user "
      "or item with id r in that folder's interaction file (ids 0..n-1).",
      "",
      "| file | shape | dtype | row r |",
      "| --- | --- | --- | --- |",
  ]
  for name, array in arrays.items():
    if name == "users.npy":
      what = "user r: its final representation u"
    elif name == "items.npy":
      what = "item r: its final representation i^ID (score of (u, i) = u . i)"
    else:
      modality = name[len("items_"):-len(".npy")]
      what = f"item r: the backbone's `{modality}` modality embedding i^{modality}"
    lines.append(f"| `{name}` | {tuple(array.shape)} | {array.dtype} | {what} |")
  lines.append("")
  if not any(name.startswith("items_") for name in arrays):
    lines.append(f"No per-modality item embeddings: `{config.model}` has none of its own (an "
                 "alignment plug-in projects the raw content features itself).")
  if original:
    files = ", ".join(f"`{os.path.basename(f)}`" for f in original["files"])
    lines.append(f"Original ids: {files} in the data folder map id r to the id it was made "
                 "from.")
  else:
    lines.append("The data folder has no id-mapping file: its ids are the original ones.")
  lines.append("Load with `numpy.load(path)`.")
  return "\n".join(lines) + "\n"


def export(run: workdir_lib.Run, out_dir: str) -> dict:
  """Writes the arrays and README.md into out_dir; returns {file name: array}."""
  arrays = embeddings(run)
  try:
    os.makedirs(out_dir, exist_ok=True)
    for name, array in arrays.items():
      np.save(os.path.join(out_dir, name), array)
    original = workdir_lib.original_ids(run.data.path, run.data.n_users, run.data.n_items)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
      f.write(readme(run, arrays, original))
  except OSError as e:
    raise workdir_lib.RunFolderError(f"{out_dir}: cannot write the export ({e.strerror})") from e
  return arrays


FLAGS = flags.FlagValues()  # this tool's own flags (tools and tests import each other freely)
workdir_lib.define_run_flags(FLAGS)
flags.DEFINE_string("out", None, "Output folder for the .npy files and README.md.",
                    flag_values=FLAGS)


def main(argv) -> int:
  """The command line; returns the exit status (errors: one `error:` line, status 1)."""
  if not workdir_lib.parse_flags(FLAGS, argv, __doc__, required=("workdir", "out")):
    return 0
  logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache != "none":
    train.enable_compilation_cache(FLAGS.compilation_cache or None)
  try:
    arrays = export(workdir_lib.load_run(FLAGS.workdir, FLAGS.data), FLAGS.out)
  except REPORTED_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {FLAGS.out}: " + ", ".join(f"{name} {tuple(a.shape)}"
                                           for name, a in arrays.items()) + ", README.md")
  return 0


def cli():
  """The `fettle-export` console script."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  cli()
