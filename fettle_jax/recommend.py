"""Top-k recommendations of a finished run, from its best-validation parameters.

  fettle-recommend --workdir=runs/default --k=20 --out=recs.csv
      [--users=users.txt] [--exclude=all|train] [--data=DIR]
  (or: python -m fettle_jax.recommend ...)

Writes a CSV `user,rank,item` (rank 1..k, best first; ids as in the data set's files) with
`user_original,item_original` added where the data folder has id-mapping files
(users.csv/items.csv of prepared data, MMRec's u_id_mapping.csv/i_id_mapping.csv,
user_ids.txt/item_ids.txt of `convert --remap`, LATTICE's user2id.json/item2id.json).
The parameters are the best validation epoch's, the ones behind metrics.json's test
numbers. `--exclude=all` (default) leaves out every item of the user's
train, valid and test interactions; `--exclude=train` leaves out train items only, which
is the evaluation protocol: Recall@K of these lists against the test split is metrics.json's
test recall@K. A user with fewer than k items left gets only those. `--users=FILE`: one
user id per line (ids 0..n-1 as in the data set's files); default every user.

Scoring goes through the backbone's `represent` and evaluation.py's `top_items` (the same
masking and ties as evaluation), `config.eval_batch_size` users per compiled batch.
"""

import csv
import os
import sys

from absl import flags
from absl import logging
import jax
import numpy as np

from fettle_jax import evaluation
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import REPORTED_ERRORS

EXCLUDE = ("all", "train")


def read_users(path: str, n_users: int) -> np.ndarray:
  """User ids from a text file, one per line (blank lines skipped), first occurrences kept."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise workdir_lib.RunFolderError(f"{path}: cannot read the users file "
                                     f"({type(e).__name__}: {e})") from None
  users = []
  for number, line in enumerate(lines, start=1):
    text = line.strip()
    if not text:
      continue
    try:
      user = int(text)
    except ValueError:
      user = None
    if user is None or not 0 <= user < n_users:
      raise workdir_lib.RunFolderError(
          f"{path}: line {number}: unknown user id {text!r} (the data set's users are "
          f"0..{n_users - 1}, as in its files)")
    users.append(user)
  if not users:
    raise workdir_lib.RunFolderError(f"{path}: no user ids (one id per line)")
  return np.array(list(dict.fromkeys(users)), np.int32)


def check_request(k: int, exclude: str, n_items: int) -> None:
  if exclude not in EXCLUDE:
    raise workdir_lib.RunFolderError(f"--exclude must be one of {EXCLUDE}, got {exclude!r}")
  if not 1 <= k <= n_items:
    raise workdir_lib.RunFolderError(f"--k must lie in [1, n_items={n_items}], got {k}")


def excluded_pairs(data, exclude: str) -> np.ndarray:
  if exclude == "train":
    return data.train
  return np.concatenate([data.train, data.valid, data.test])


def top_k(user_emb, item_emb, users: np.ndarray, excluded, k: int,
          batch_size: int) -> np.ndarray:
  """[len(users), k] item ids: evaluation.top_items in batches of `batch_size` users (the
  last padded with user 0, as in evaluation), the `excluded` items (indptr, items: CSR rows
  by user, evaluation.csr_of_pairs) masked as sparse rows; one compiled program (every
  batch's rows padded to the widest batch's count)."""
  indptr, indices = excluded
  rank = jax.jit(evaluation.top_items, static_argnums=5)
  n_batch = -(-len(users) // batch_size)
  padded = np.zeros(n_batch * batch_size, np.int32)
  padded[:len(users)] = users
  counts = (indptr[padded + 1] - indptr[padded]).reshape(n_batch, batch_size)
  width = max(1, int(counts.sum(axis=1).max(initial=0)))
  out = []
  for b in range(n_batch):
    block = padded[b * batch_size:(b + 1) * batch_size]
    rows, items = evaluation.seen_rows(indptr, indices, block, width)
    out.append(np.asarray(rank(user_emb, item_emb, block, rows, items, k)))
  return np.concatenate(out)[:len(users)]


def recommend(run: workdir_lib.Run, k: int, users=None, exclude: str = "all"):
  """(users [U], items [U, k], n_kept [U]): each user's top-k item ids, best first; only the
  first n_kept[u] of a row are real (a user with fewer than k items left after exclusion)."""
  data, config = run.data, run.experiment.config
  check_request(k, exclude, data.n_items)
  users = np.arange(data.n_users, dtype=np.int32) if users is None else np.asarray(users,
                                                                                  np.int32)
  excluded = evaluation.csr_of_pairs(excluded_pairs(data, exclude), data.n_users)
  reps = workdir_lib.represent(run)
  items = top_k(reps.users, reps.items, users, excluded, k, config.eval_batch_size)
  indptr = excluded[0]
  n_excluded = indptr[users + 1] - indptr[users]
  n_kept = np.minimum(k, data.n_items - n_excluded)
  return users, items, n_kept


def write_csv(path: str, users, items, n_kept, original=None) -> int:
  """Writes the recommendations; returns the number of rows."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  header = ["user", "rank", "item"] + (["user_original", "item_original"] if original else [])
  rows = 0
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for user, row, kept in zip(users.tolist(), items.tolist(), n_kept.tolist()):
      for rank, item in enumerate(row[:kept], start=1):
        line = [user, rank, item]
        if original:
          line += [original["users"][user], original["items"][item]]
        writer.writerow(line)
        rows += 1
  return rows


FLAGS = flags.FlagValues()  # this tool's own flags (tools and tests import each other freely)
workdir_lib.define_run_flags(FLAGS)
flags.DEFINE_integer("k", 20, "Recommendations per user.", flag_values=FLAGS)
flags.DEFINE_string("out", "recs.csv", "Output CSV: user,rank,item[,user_original,"
                    "item_original].", flag_values=FLAGS)
flags.DEFINE_string("users", None, "Text file, one user id per line; default: every user.",
                    flag_values=FLAGS)
flags.DEFINE_enum("exclude", "all", list(EXCLUDE), "Items left out of a user's list: 'all' "
                  "(train, valid and test interactions) or 'train' (the evaluation protocol).",
                  flag_values=FLAGS)


def main(argv) -> int:
  """The command line; returns the exit status (errors: one `error:` line, status 1)."""
  if not workdir_lib.parse_flags(FLAGS, argv, __doc__):
    return 0
  logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache != "none":
    train.enable_compilation_cache(FLAGS.compilation_cache or None)
  try:
    # Cheap checks first (metrics.json, the users file), then the run is rebuilt.
    metrics = workdir_lib.read_metrics(FLAGS.workdir)
    check_request(FLAGS.k, FLAGS.exclude, metrics["data"]["n_items"])
    users = read_users(FLAGS.users, metrics["data"]["n_users"]) if FLAGS.users else None
    run = workdir_lib.load_run(FLAGS.workdir, FLAGS.data)
    users, items, n_kept = recommend(run, FLAGS.k, users, FLAGS.exclude)
    original = workdir_lib.original_ids(run.data.path, run.data.n_users, run.data.n_items)
    rows = write_csv(FLAGS.out, users, items, n_kept, original)
  except REPORTED_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  short = int((n_kept < FLAGS.k).sum())
  print(f"wrote {FLAGS.out}: {rows} rows, top-{FLAGS.k} of {len(users)} users from the best "
        f"epoch {run.metrics.get('best_epoch')} (exclude={FLAGS.exclude})"
        + (f"; {short} users had fewer than {FLAGS.k} items left" if short else ""))
  return 0


def cli():
  """The `fettle-recommend` console script."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  cli()
