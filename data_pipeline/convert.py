"""Converts a LATTICE JSON split folder to MMRec's format.

  python -m data_pipeline.convert --src ../shared/data/amazon-baby-5core --out data/baby --name baby
"""

import os
import sys

from absl import app
from absl import flags

from data_pipeline.errors import DataError
from data_pipeline.lattice import convert_to_mmrec

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "LATTICE-format folder (train.json, val.json, test.json).")
flags.DEFINE_string("out", None, "Output folder for the MMRec-format data set.")
flags.DEFINE_string("name", None, "Data set name: the output is <out>/<name>.inter.")


def main(argv):
  del argv
  if not (FLAGS.src and FLAGS.out and FLAGS.name):
    sys.exit("error: --src, --out and --name are required")
  try:
    out = convert_to_mmrec(FLAGS.src, FLAGS.out, FLAGS.name)
  except DataError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {os.path.join(out, FLAGS.name + '.inter')}")


if __name__ == "__main__":
  app.run(main)
