"""Converts a LATTICE JSON split folder to MMRec's format, or renumbers ids to 0..n-1.

  fettle-convert --src=amazon-baby-5core --out=data/baby --name=baby
  fettle-convert --src=raw/ --out=data/clean --name=clean --remap
  (or: python -m data_pipeline.convert --src=... --out=... --name=...)

--remap reads either format without the 0..n-1 id rule, renumbers users and items in
increasing order of their original ids, keeps the feature rows of the items that occur (row
k = new item k; an original id with no feature row is an error) and writes `user_ids.txt` /
`item_ids.txt` (line k = the original id of new id k).
"""

import os
import sys

from absl import flags

from data_pipeline.errors import DataError
from data_pipeline.lattice import convert_to_mmrec, remap_to_mmrec
from fettle_jax.tools import command

FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not (FLAGS.src and FLAGS.out and FLAGS.name):
    sys.exit("error: --src, --out and --name are required")
  try:
    convert = remap_to_mmrec if FLAGS.remap else convert_to_mmrec
    out = convert(FLAGS.src, FLAGS.out, FLAGS.name)
  except DataError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {os.path.join(out, FLAGS.name + '.inter')}")


def cli():
  """The `fettle-convert` console script."""
  # Defined here, not at import: other tools define --out in the same process.
  flags.DEFINE_string("src", None, "LATTICE-format folder (train.json, val.json, test.json).")
  flags.DEFINE_string("out", None, "Output folder for the MMRec-format data set.")
  flags.DEFINE_string("name", None, "Data set name: the output is <out>/<name>.inter.")
  flags.DEFINE_bool("remap", False, "Renumber user and item ids to 0..n-1 (either input format).")
  command.run_app(main, __name__)


if __name__ == "__main__":
  cli()
