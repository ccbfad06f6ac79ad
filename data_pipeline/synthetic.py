"""Paper-scale synthetic twins of the FETTLE data sets (Table 1: Baby, Sports, Clothing).

  fettle-synthetic --like=baby --out=data/baby-synth [--seed=0] [--scale=1.0]
  (or: python -m data_pipeline.synthetic --like=baby --out=data/baby-synth)

Writes MMRec format (`<like>.inter`, `image_feat.npy` 4096-d, `text_feat.npy` 384-d) with exactly
the paper's user / item / interaction counts, plus `item_noise.npy`, `item_latent.npy` and
`metadata.json` so one can check, per item, which modality is the cleaner one.

Generative model (all Gaussian draws are standard normal unless said otherwise):
- items have latent factors q_i in R^k and a log-popularity b_i ~ N(0, pop_sigma^2); users have
  preferences p_u in R^k and a log-activity a_u ~ N(0, activity_sigma^2);
  affinity(u, i) = beta * <p_u, q_i> / sqrt(k).
- interactions (no duplicate pairs, every user and item >= min_degree):
  1. each item picks min_degree distinct users with probability ~ exp(affinity + a_u), sampled
     without replacement (Gumbel top-k), so no item is left cold;
  2. each user gets extra interactions: enough to reach min_degree, plus a share of the rest of
     the budget drawn multinomially with weights exp(a_u), which skews user activity;
  3. each user samples its extra items without replacement with probability
     ~ exp(affinity + b_i) among items it does not already have, which skews item popularity.
- features of modality m (image d=4096, text d=384): x_i = (q_i + s_mi * e_mi) A_m + ambient * n_mi,
  with A_m a random k x d map with orthonormal rows scaled by sqrt(d / k) (unit variance per dim)
  and s_mi the item's latent noise level in that modality. Per item and modality, independently,
  the modality is "clean" with probability p_clean (s ~ U[clean_low, clean_high]) and "noisy"
  otherwise (s ~ U[noisy_low, noisy_high]): some items have a clean image and a noisy text, others
  the reverse, so the right direction of cross-modal alignment differs across items.
- split: per user, a seeded random order; the last max(1, (n + 5) // 10) go to test, the same
  number before them to valid, the rest to train (the ml100k rule with a random order for time).
  Most users have 5-9 interactions and so one valid and one test each: overall about 73/13/13.
"""

import json
import os
import sys
import time
import zlib
from typing import Dict, Optional

import numpy as np
from absl import flags

from data_pipeline.ml100k import split_by_order
from data_pipeline.mmrec_writer import TEST, TRAIN, VALID, write_mmrec
from fettle_jax.tools import command

# Table 1 of the FETTLE paper (users, items, interactions).
PAPER_COUNTS = {
    "baby": (19445, 7050, 160792),
    "sports": (33598, 18357, 296337),
    "clothing": (39387, 23033, 278677),
}
DIMS = {"image": 4096, "text": 384}
DEFAULT_PARAMS = {
    "latent_dim": 32,
    "beta": 2.0,  # preference strength: how much affinity matters against popularity
    "pop_sigma": 1.0,
    "activity_sigma": 1.0,
    "min_degree": 5,
    "p_clean": 0.5,
    "clean_low": 0.1, "clean_high": 0.4,
    "noisy_low": 1.0, "noisy_high": 2.0,
    "ambient": 0.5,
}
_CHUNK = 1024  # rows of scores per step: 3 buffers of 1024 x 39387 float32 = 480 MB at most


def scaled_counts(like: str, scale: float = 1.0):
  if like not in PAPER_COUNTS:
    raise ValueError(f"unknown --like {like!r}; choose from {', '.join(PAPER_COUNTS)}")
  return tuple(max(1, int(round(c * scale))) for c in PAPER_COUNTS[like])


def _gumbel_topk(logits: np.ndarray, k: np.ndarray, rng: np.random.Generator,
                 keys: np.ndarray, scratch: np.ndarray):
  """Per row r, k[r] distinct columns sampled without replacement with probability ~ exp(logits).

  Gumbel top-k: the k largest of logits + Gumbel noise are a sample without replacement from the
  softmax. Columns with logit -inf are never chosen (rows must have k[r] finite logits).
  `keys` and `scratch` are float32 buffers shaped like `logits`, reused across calls because
  fresh large arrays cost more in page faults than the arithmetic. Returns (rows, cols).
  """
  kmax = int(k.max()) if len(k) else 0
  if kmax == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  # keys = -(logits + Gumbel) = log(Exp(1)) - logits: the k smallest keys win. The float32
  # exponential sampler is several times faster than gumbel().
  rng.standard_exponential(out=keys, dtype=np.float32)
  np.maximum(keys, np.float32(1e-30), out=keys)
  np.log(keys, out=keys)
  np.subtract(keys, logits, out=keys)
  # Per-row threshold = k[r]-th smallest key; partitioning values is ~3x faster than argpartition.
  np.copyto(scratch, keys)
  scratch.partition(kmax - 1, axis=1)
  smallest = np.sort(scratch[:, :kmax], axis=1)
  thr = smallest[np.arange(len(k)), np.maximum(k, 1) - 1]
  thr[k == 0] = -np.inf
  chosen = keys <= thr[:, None]
  # float32 keys can tie at the threshold (rarely): redo those rows exactly, ties by column.
  bad = np.flatnonzero(chosen.sum(axis=1) != k)
  for r in bad:
    chosen[r] = False
    chosen[r, np.argsort(keys[r], kind="stable")[:k[r]]] = True
  return np.nonzero(chosen)


def _sample_rows(row_f: np.ndarray, col_f: np.ndarray, col_bias: np.ndarray, scale: float,
                 k: np.ndarray, rng: np.random.Generator, exclude=None):
  """Row r draws k[r] distinct columns with probability ~ exp(scale <row_r, col_c> + bias_c).

  exclude: optional (rows, cols) int arrays sorted by row, of cells that cannot be drawn.
  Works on _CHUNK rows at a time. Returns (rows, cols) of the drawn cells.
  """
  n_rows, n_cols = len(row_f), len(col_f)
  rows_per = min(_CHUNK, n_rows)
  logits_buf, keys_buf, scratch_buf = (np.empty((rows_per, n_cols), np.float32) for _ in range(3))
  col_t = np.ascontiguousarray(col_f.T, np.float32)
  bias = col_bias.astype(np.float32)
  if exclude is not None:
    starts = np.searchsorted(exclude[0], np.arange(n_rows + 1))
  out_rows, out_cols = [], []
  for lo in range(0, n_rows, _CHUNK):
    hi = min(n_rows, lo + _CHUNK)
    logits = logits_buf[:hi - lo]
    np.matmul(row_f[lo:hi].astype(np.float32), col_t, out=logits)
    logits *= np.float32(scale)
    logits += bias
    if exclude is not None:
      s, e = starts[lo], starts[hi]
      logits[exclude[0][s:e] - lo, exclude[1][s:e]] = -np.inf
    rows, cols = _gumbel_topk(logits, k[lo:hi], rng, keys_buf[:hi - lo], scratch_buf[:hi - lo])
    out_rows.append(rows + lo)
    out_cols.append(cols)
  return np.concatenate(out_rows).astype(np.int64), np.concatenate(out_cols).astype(np.int64)


def generate_interactions(n_users: int, n_items: int, n_inter: int, p: np.ndarray, q: np.ndarray,
                          b: np.ndarray, a: np.ndarray, beta: float, min_degree: int,
                          rng: np.random.Generator):
  """(users, items) int64 arrays, sorted by (user, item); see the module docstring, steps 1-3."""
  if n_users < min_degree or n_items < min_degree:
    raise ValueError(f"need at least {min_degree} users and items")
  scale = beta / np.sqrt(p.shape[1])
  # 1. min_degree users per item, by affinity and user activity.
  res_items, res_users = _sample_rows(q, p, a, scale, np.full(n_items, min_degree), rng)
  reserved = np.bincount(res_users, minlength=n_users)
  # 2. extra interactions per user.
  need = np.maximum(0, min_degree - reserved)
  budget = n_inter - len(res_items) - int(need.sum())
  if budget < 0:
    raise ValueError(f"{n_inter} interactions cannot give {n_users} users and {n_items} items "
                     f"{min_degree} each")
  w = np.exp(a - a.max())
  extra = need + rng.multinomial(budget, w / w.sum())
  if np.any(reserved + extra > n_items):
    raise ValueError("a user would need more interactions than there are items")
  # 3. users draw their extra items by affinity and item popularity, never one they hold.
  order = np.lexsort((res_items, res_users))
  new_users, new_items = _sample_rows(p, q, b, scale, extra, rng,
                                      exclude=(res_users[order], res_items[order]))
  users = np.concatenate([res_users, new_users])
  items = np.concatenate([res_items, new_items])
  order = np.lexsort((items, users))
  return users[order], items[order]


def random_split(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Per user random 80/10/10 split with >= 1 valid and test each (ml100k's rule, random order)."""
  order = np.lexsort((rng.random(len(users)), users))
  return split_by_order(users, order)


def _orthonormal_map(k: int, d: int, rng: np.random.Generator) -> np.ndarray:
  """k x d with orthonormal rows scaled by sqrt(d / k): unit variance per output dim."""
  basis, _ = np.linalg.qr(rng.standard_normal((d, k)))
  return (basis.T * np.sqrt(d / k)).astype(np.float32)


def modality_features(q: np.ndarray, noise: np.ndarray, d: int, ambient: float,
                      rng: np.random.Generator) -> np.ndarray:
  """x_i = (q_i + noise_i * e_i) A + ambient * n_i, float32 [n_items, d]."""
  n, k = q.shape
  a_map = _orthonormal_map(k, d, rng)
  latent = q + noise[:, None] * rng.standard_normal((n, k))
  x = rng.standard_normal((n, d), dtype=np.float32)
  x *= np.float32(ambient)
  x += latent.astype(np.float32) @ a_map
  return x


def generate(like: str, seed: int = 0, scale: float = 1.0, features: bool = True,
             params: Optional[dict] = None) -> Dict:
  """Generates a twin of data set `like` with counts scaled by `scale`.

  Returns a dict: users, items, labels (int64 [n_inter]); image, text (float32, only when
  `features`); item_noise (float32 [n_items, 2]: image, text latent noise std); item_latent,
  user_latent; counts and params. Interactions do not depend on `features`.
  """
  params = {**DEFAULT_PARAMS, **(params or {})}
  n_users, n_items, n_inter = scaled_counts(like, scale)
  # Independent streams per stage: skipping the features leaves the interactions unchanged.
  ss = np.random.SeedSequence([seed, zlib.crc32(like.encode())])
  r_latent, r_inter, r_split, r_noise, r_image, r_text = (np.random.default_rng(s)
                                                          for s in ss.spawn(6))
  k = params["latent_dim"]
  q = r_latent.standard_normal((n_items, k))
  p = r_latent.standard_normal((n_users, k))
  b = params["pop_sigma"] * r_latent.standard_normal(n_items)
  a = params["activity_sigma"] * r_latent.standard_normal(n_users)
  users, items = generate_interactions(n_users, n_items, n_inter, p, q, b, a, params["beta"],
                                       params["min_degree"], r_inter)
  labels = random_split(users, r_split)
  noise = np.empty((n_items, 2), np.float32)
  for m in range(2):
    clean = r_noise.random(n_items) < params["p_clean"]
    low = np.where(clean, params["clean_low"], params["noisy_low"])
    high = np.where(clean, params["clean_high"], params["noisy_high"])
    noise[:, m] = low + (high - low) * r_noise.random(n_items)
  out = {
      "like": like, "seed": seed, "scale": scale, "params": params,
      "n_users": n_users, "n_items": n_items, "n_interactions": int(len(users)),
      "users": users, "items": items, "labels": labels,
      "item_noise": noise, "item_latent": q.astype(np.float32),
      "user_latent": p.astype(np.float32), "item_log_popularity": b.astype(np.float32),
  }
  if features:
    out["image"] = modality_features(q, noise[:, 0], DIMS["image"], params["ambient"], r_image)
    out["text"] = modality_features(q, noise[:, 1], DIMS["text"], params["ambient"], r_text)
  return out


def metadata(data: Dict) -> dict:
  """metadata.json: counts, degree summaries, the generative parameters and model description."""
  users, items, labels, noise = data["users"], data["items"], data["labels"], data["item_noise"]
  counts = np.bincount(labels, minlength=3)
  udeg = np.bincount(users, minlength=data["n_users"])
  ideg = np.bincount(items, minlength=data["n_items"])
  return {
      "name": data["like"],
      "synthetic": True,
      "paper_counts": dict(zip(("n_users", "n_items", "n_interactions"),
                               PAPER_COUNTS[data["like"]])),
      "seed": data["seed"], "scale": data["scale"],
      "n_users": data["n_users"], "n_items": data["n_items"],
      "n_interactions": data["n_interactions"],
      "n_train": int(counts[TRAIN]), "n_valid": int(counts[VALID]), "n_test": int(counts[TEST]),
      "user_degree": {"min": int(udeg.min()), "mean": float(udeg.mean()), "max": int(udeg.max())},
      "item_degree": {"min": int(ideg.min()), "mean": float(ideg.mean()), "max": int(ideg.max())},
      "features": {m: [data["n_items"], d] for m, d in DIMS.items() if m in data},
      "params": data["params"],
      "model": __doc__[__doc__.index("Generative model"):].strip(),
      "item_noise": {
          "file": "item_noise.npy: float32 [n_items, 2], columns (image, text): the std of the "
                  "Gaussian noise added to the item's latent factor in that modality "
                  "(smaller = cleaner)",
          "fraction_image_cleaner": float(np.mean(noise[:, 0] < noise[:, 1])),
          "mean": [float(noise[:, 0].mean()), float(noise[:, 1].mean())],
      },
      "files": {
          "item_latent.npy": "float32 [n_items, latent_dim]: q_i, the signal both modalities carry",
          "item_noise.npy": "float32 [n_items, 2]: latent noise std (image, text)",
      },
  }


def write(data: Dict, out_dir: str) -> str:
  """Writes the MMRec folder plus item_noise.npy, item_latent.npy and metadata.json."""
  feats = {m: data[m] for m in DIMS if m in data}
  write_mmrec(out_dir, data["like"], data["users"], data["items"], data["labels"], feats)
  for name in ("item_noise", "item_latent"):
    np.save(os.path.join(out_dir, f"{name}.npy"), data[name])
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(metadata(data), f, indent=2)
  return out_dir


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not (FLAGS.like and FLAGS.out):
    sys.exit("usage: fettle-synthetic --like=baby|sports|clothing --out=DIR [--seed=0] "
             "[--scale=1.0]")
  start = time.time()
  try:
    data = generate(FLAGS.like, FLAGS.seed, FLAGS.scale)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"generated {data['n_users']} users, {data['n_items']} items, "
        f"{data['n_interactions']} interactions in {time.time() - start:.1f} s")
  write(data, FLAGS.out)
  print(f"wrote {os.path.join(FLAGS.out, FLAGS.like + '.inter')} and features "
        f"({time.time() - start:.1f} s total)")


def cli():
  """The `fettle-synthetic` console script."""
  # Defined here, not at import: other modules define flags such as --out in the same process.
  flags.DEFINE_string("like", None, f"Which paper data set to imitate: {', '.join(PAPER_COUNTS)}.")
  flags.DEFINE_string("out", None, "Output folder (MMRec format).")
  flags.DEFINE_integer("seed", 0, "Random seed; the output is a deterministic function of it.")
  flags.DEFINE_float("scale", 1.0, "Shrinks users, items and interactions proportionally.")
  command.run_app(main, __name__)


if __name__ == "__main__":
  cli()
