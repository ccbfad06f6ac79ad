"""MovieLens-100K, as shipped inside the PyPI wheel of RecBole 1.2.1, turned into MMRec format.

The wheel (`recbole/dataset_example/ml-100k/`) carries RecBole "atomic files": tab-separated text
with typed headers such as `user_id:token  item_id:token  rating:float  timestamp:float`. The wheel
is fetched with `pip download` (never installed) and read with `zipfile`.

Outputs (see `build`): `ml100k.inter`, `text_feat.npy` (MiniLM of one sentence per item),
`kg_feat.npy` (TF-IDF + truncated SVD of the item knowledge-graph attributes), `items.csv`,
`users.csv`, `metadata.json` and `README.md`.
"""

import csv
import json
import os
import re
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from data_pipeline import wheels
from data_pipeline.errors import DataError
from data_pipeline.mmrec_writer import TEST, TRAIN, VALID, write_mmrec

NAME = "ml100k"
RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
# PyPI's sha256 of the wheel: a hand-placed or truncated file is caught before it is read.
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ZIP_DIR = "recbole/dataset_example/ml-100k/"
KG_DIM = 256
KG_MIN_DF = 2
TEXT_DIM = 384

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- download


def fetch_wheel(cache_dir: str, log: Log = print) -> str:
  """Returns the path of the RecBole wheel in `cache_dir`, downloading it with pip if absent."""
  return wheels.fetch_wheel(f"recbole=={RECBOLE_VERSION}", WHEEL_NAME, WHEEL_SHA256, cache_dir,
                            "about 2 MB", log)


def read_wheel(wheel_path: str) -> Dict[str, str]:
  """Returns {"inter", "item", "kg", "link"} -> text of `ml-100k.<ext>` inside the wheel."""
  out = {}
  try:
    with zipfile.ZipFile(wheel_path) as z:
      for ext in ("inter", "item", "kg", "link"):
        member = f"{ZIP_DIR}ml-100k.{ext}"
        try:
          raw = z.read(member)
        except KeyError:
          raise DataError(f"{wheel_path}: {member} not found in the wheel") from None
        # A few titles are UTF-8 (e.g. "Cérémonie, La"); never fail on a stray byte.
        out[ext] = raw.decode("utf-8", errors="replace")
  except zipfile.BadZipFile:
    raise DataError(f"{wheel_path}: not a zip file; delete it and rerun") from None
  return out


def read_atomic(text: str, source: str) -> Dict[str, List[str]]:
  """Parses a RecBole atomic file: column name (type suffix dropped) -> list of string values."""
  lines = text.splitlines()
  if not lines:
    raise DataError(f"{source}: empty file")
  names = [h.split(":")[0] for h in lines[0].split("\t")]
  columns = {n: [] for n in names}
  for lineno, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != len(names):
      raise DataError(f"{source}:{lineno}: {len(fields)} fields, header has {len(names)}")
    for n, v in zip(names, fields):
      columns[n].append(v)
  return columns


def _require(columns: Dict[str, List[str]], names: Sequence[str], source: str) -> None:
  for n in names:
    if n not in columns:
      raise DataError(f"{source}: missing column {n!r} (header: {list(columns)})")


def _as_int(values: List[str], source: str, column: str) -> np.ndarray:
  try:
    return np.array([int(float(v)) for v in values], np.int64)
  except ValueError:
    raise DataError(f"{source}: column {column} has a non-numeric value") from None


# ----------------------------------------------------------------------------- split


def split_counts(n: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(n_valid, n_test) for users with n interactions: each max(1, n/10 rounded half up).

  Integer arithmetic ((n + 5) // 10) so the rule has no floating-point or banker's-rounding
  ambiguity. Tiny users are clamped so that test is filled first, then valid (n=1: test only;
  n=2: one valid, one test); users with n >= 3 always keep at least one train interaction.
  """
  n = np.asarray(n, np.int64)
  want = np.maximum(1, (n + 5) // 10)
  n_test = np.minimum(n, want)
  n_valid = np.minimum(n - n_test, want)
  return n_valid, n_test


def split_by_order(users: np.ndarray, order: np.ndarray) -> np.ndarray:
  """Per-user split: interactions ranked by `order` (a permutation sorted by user first).

  `order` lists all interaction indices grouped by user, each user's in time order. The last
  n_test of each user go to test, the n_valid before them to valid, the rest to train.
  Returns x_label per interaction (0 train, 1 valid, 2 test).
  """
  users = np.asarray(users, np.int64)
  u_sorted = users[order]
  if np.any(np.diff(u_sorted) < 0):
    raise ValueError("order must group interactions by ascending user id")
  n_users = int(users.max()) + 1 if len(users) else 0
  counts = np.bincount(users, minlength=n_users)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(len(order)) - starts[u_sorted]  # position within the user's sequence
  n_valid, n_test = split_counts(counts)
  from_end = counts[u_sorted] - rank  # 1 for the user's last interaction
  labels_sorted = np.full(len(order), TRAIN, np.int64)
  labels_sorted[from_end <= n_test[u_sorted] + n_valid[u_sorted]] = VALID
  labels_sorted[from_end <= n_test[u_sorted]] = TEST
  labels = np.empty_like(labels_sorted)
  labels[order] = labels_sorted
  return labels


def chronological_split(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
  """Per user, sorted by (timestamp, item id): last 10% test, the 10% before valid, rest train."""
  order = np.lexsort((np.asarray(items), np.asarray(timestamps), np.asarray(users)))
  return split_by_order(users, order)


def dense_ids(raw: Sequence[str], source: str, column: str) -> Tuple[np.ndarray, List[str]]:
  """Maps raw tokens to 0..n-1 in numeric order of the token. Returns (ids, sorted raw tokens)."""
  unique = set(raw)
  try:
    vocab = sorted(unique, key=int)
  except ValueError:
    raise DataError(f"{source}: column {column} has a non-integer token") from None
  index = {tok: i for i, tok in enumerate(vocab)}
  return np.array([index[t] for t in raw], np.int64), vocab


# ----------------------------------------------------------------------------- text


_YEAR_IN_TITLE = re.compile(r"\(\d{4}\)\s*$")
_PLACEHOLDER_TITLES = {"", "unknown", "unkonwn"}  # item 267 is "unkonwn" (sic) in every field


def item_title(title: str, year: str) -> str:
  """"Toy Story" + "1995" -> "Toy Story (1995)"; the year is kept out when not a 4-digit year
  (item 1412 has year "V") or when the title already ends with one."""
  title = title.strip()
  if title.lower() in _PLACEHOLDER_TITLES:
    return "Unknown title"
  year = year.strip()
  if re.fullmatch(r"\d{4}", year) and not _YEAR_IN_TITLE.search(title):
    title = f"{title} ({year})"
  return title


def item_sentence(title: str, genres: Sequence[str]) -> str:
  """"<title>. Genres: <g1>, <g2>." (just "<title>." when there are no genres)."""
  base = title if title.endswith((".", "!", "?")) else title + "."
  return f"{base} Genres: {', '.join(genres)}." if genres else base


def item_texts(item_text: str, raw_items: Sequence[str]) -> List[Dict[str, str]]:
  """Per dense item (order of `raw_items`): raw id, title, genres and the sentence to encode."""
  source = "ml-100k.item"
  cols = read_atomic(item_text, source)
  _require(cols, ("item_id", "movie_title", "release_year", "class"), source)
  by_id = {i: k for k, i in enumerate(cols["item_id"])}
  rows = []
  for raw in raw_items:
    if raw in by_id:
      k = by_id[raw]
      title = item_title(cols["movie_title"][k], cols["release_year"][k])
      # Genres are space-separated single tokens ("Children's", "Sci-Fi", "Film-Noir").
      genres = cols["class"][k].split()
    else:
      title, genres = "Unknown title", []
    rows.append({"raw_item_id": raw, "title": title, "genres": " ".join(genres),
                 "sentence": item_sentence(title, genres)})
  return rows


# ----------------------------------------------------------------------------- knowledge graph


def kg_features(link_text: str, kg_text: str, raw_items: Sequence[str], dim: int = KG_DIM,
                min_df: int = KG_MIN_DF) -> Tuple[np.ndarray, dict]:
  """Item x (relation, tail entity) multi-hot -> TF-IDF -> L2 rows -> truncated SVD to `dim`.

  Only triples whose head is an item's entity (`.link`) are used: the `.kg` file also holds many
  edges reversed (e.g. film.film.genre and film.film_genre.films_in_this_genre), so adding the
  incoming edges would count those facts twice. Columns held by fewer than `min_df` items are
  dropped (they say nothing about item-item similarity). idf = ln((1 + n) / (1 + df)) + 1 with n
  the number of items (smooth idf). The SVD is exact: top-`dim` eigenpairs of the rows' Gram matrix
  (items with features only; cheap for a few thousand items), item embedding = U_k * S_k, each
  component's sign fixed so its largest-magnitude entry is positive -- deterministic, no random
  start. Items with no kept column get the mean embedding of the others.
  Returns (float32 [n_items, dim], stats).
  """
  links = read_atomic(link_text, "ml-100k.link")
  _require(links, ("item_id", "entity_id"), "ml-100k.link")
  triples = read_atomic(kg_text, "ml-100k.kg")
  _require(triples, ("head_id", "relation_id", "tail_id"), "ml-100k.kg")
  item_index = {raw: k for k, raw in enumerate(raw_items)}
  entity_items: Dict[str, List[int]] = {}
  for raw, entity in zip(links["item_id"], links["entity_id"]):
    if raw in item_index:
      entity_items.setdefault(entity, []).append(item_index[raw])
  pairs = set()
  for h, r, t in zip(triples["head_id"], triples["relation_id"], triples["tail_id"]):
    for item in entity_items.get(h, ()):
      pairs.add((item, r, t))
  col_of: Dict[Tuple[str, str], int] = {}
  rows, cols = [], []
  for item, r, t in sorted(pairs):  # sorted: column order (and so the SVD) is reproducible
    rows.append(item)
    cols.append(col_of.setdefault((r, t), len(col_of)))
  n_items = len(raw_items)
  x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_items, len(col_of)))
  df = np.asarray((x > 0).sum(axis=0)).ravel()
  keep = np.flatnonzero(df >= min_df)
  x = x[:, keep].tocsr()
  idf = np.log((1.0 + n_items) / (1.0 + df[keep])) + 1.0
  x = x @ sp.diags(idf)
  norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
  has = np.flatnonzero(norms > 0)
  x = (sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x).tocsr()
  if not len(has):
    raise DataError("ml-100k.kg: no item has a knowledge-graph attribute shared with another item")
  xr = x[has]
  gram = (xr @ xr.T).toarray()
  k = min(dim, len(has))
  # Only the top k eigenpairs: several times cheaper than the full decomposition.
  evals, evecs = scipy.linalg.eigh(gram, subset_by_index=[len(has) - k, len(has) - 1])
  evals, evecs = evals[::-1], evecs[:, ::-1]  # descending
  emb = evecs * np.sqrt(np.maximum(evals, 0.0))
  sign = np.sign(emb[np.argmax(np.abs(emb), axis=0), np.arange(k)])
  emb = emb * np.where(sign == 0, 1.0, sign)
  feat = np.zeros((n_items, dim), np.float64)
  feat[has, :k] = emb
  missing = np.setdiff1d(np.arange(n_items), has)
  feat[missing] = feat[has].mean(axis=0)
  total = float(np.trace(gram))  # = sum of all squared singular values
  stats = {
      "n_linked_items": int(sum(len(v) for v in entity_items.values())),
      "n_triples_used": len(pairs),
      "n_relations": len({r for (r, _) in col_of}),
      "n_relations_kept": len({r for (r, _), c in col_of.items() if df[c] >= min_df}),
      "n_tail_entities": len({t for (_, t) in col_of}),
      "n_columns_all": len(col_of),
      "n_columns_kept": int(len(keep)),
      "min_df": min_df,
      "n_items_with_features": int(len(has)),
      "n_items_filled_with_mean": int(len(missing)),
      "svd_dim": dim,
      "svd_rank_used": int(k),
      "svd_energy_kept": float(evals.sum() / total) if total > 0 else 0.0,
  }
  return feat.astype(np.float32), stats


# ----------------------------------------------------------------------------- build


def _default_encoder():
  try:
    from data_pipeline.text_encoder import MiniLMEncoder  # lazy: needs jax/flax and weights
  except ImportError as e:
    raise DataError(f"text encoder unavailable ({e}); install the project's requirements") from None
  return MiniLMEncoder()


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def build(out_dir: str, cache_dir: str, encoder=None, log: Log = print,
          wheel_path: Optional[str] = None) -> dict:
  """Writes the whole ml100k data set into `out_dir` (already empty). Returns the metadata."""
  wheel_path = wheel_path or fetch_wheel(cache_dir, log)
  log(f"reading MovieLens-100K from {wheel_path}")
  files = read_wheel(wheel_path)
  inter = read_atomic(files["inter"], "ml-100k.inter")
  _require(inter, ("user_id", "item_id", "timestamp"), "ml-100k.inter")
  users, raw_users = dense_ids(inter["user_id"], "ml-100k.inter", "user_id")
  items, raw_items = dense_ids(inter["item_id"], "ml-100k.inter", "item_id")
  stamps = _as_int(inter["timestamp"], "ml-100k.inter", "timestamp")
  labels = chronological_split(users, items, stamps)
  counts = np.bincount(labels, minlength=3)
  log(f"{len(raw_users)} users, {len(raw_items)} items, {len(users)} interactions "
      f"(train {counts[TRAIN]}, valid {counts[VALID]}, test {counts[TEST]})")

  log("building kg features (TF-IDF + truncated SVD)")
  kg, kg_stats = kg_features(files["link"], files["kg"], raw_items)
  log(f"kg: {kg_stats['n_relations_kept']} relations, {kg_stats['n_tail_entities']} tail entities, "
      f"{kg_stats['n_columns_kept']} of {kg_stats['n_columns_all']} columns kept, "
      f"{kg_stats['n_items_filled_with_mean']} items filled with the mean")

  texts = item_texts(files["item"], raw_items)
  sentences = [t["sentence"] for t in texts]
  encoder = encoder if encoder is not None else _default_encoder()
  log(f"encoding {len(sentences)} item sentences with {type(encoder).__name__}")
  text = np.asarray(encoder.encode(sentences, progress=True), np.float32)
  if text.ndim != 2 or text.shape[0] != len(sentences) or not np.all(np.isfinite(text)):
    raise DataError(f"text encoder returned shape {text.shape} (or non-finite values) for "
                    f"{len(sentences)} sentences")

  write_mmrec(out_dir, NAME, users, items, labels, {"text": text, "kg": kg})
  _write_csv(os.path.join(out_dir, "items.csv"), ("item_id", "raw_item_id", "title", "genres",
                                                  "sentence"),
             [(k, t["raw_item_id"], t["title"], t["genres"], t["sentence"])
              for k, t in enumerate(texts)])
  _write_csv(os.path.join(out_dir, "users.csv"), ("user_id", "raw_user_id"),
             list(enumerate(raw_users)))
  meta = {
      "name": NAME,
      "source": {"wheel": WHEEL_NAME, "sha256": WHEEL_SHA256, "folder": ZIP_DIR},
      "n_users": len(raw_users),
      "n_items": len(raw_items),
      "n_interactions": int(len(users)),
      "n_train": int(counts[TRAIN]),
      "n_valid": int(counts[VALID]),
      "n_test": int(counts[TEST]),
      "min_user_interactions": int(np.bincount(users).min()),
      "features": {"text": list(text.shape), "kg": list(kg.shape)},
      "text_encoder": type(encoder).__name__,
      "kg": kg_stats,
  }
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=2)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(readme(meta, sentences[0]))
  return meta


def readme(meta: dict, example: str) -> str:
  """The data set's README.md: counts and the exact rules that produced each file."""
  kg = meta["kg"]
  encoder = meta["text_encoder"]
  if encoder == "MiniLMEncoder":
    encoder = "MiniLMEncoder (all-MiniLM-L6-v2, mean pooling, L2-normalized, 384-d)"
  return f"""# ml100k (MovieLens-100K) in MMRec format

Made by `python -m data_pipeline.prepare ml100k` from `{ZIP_DIR}` inside the PyPI
wheel `{WHEEL_NAME}` (sha256 `{WHEEL_SHA256}`).

| | count |
| --- | ---: |
| users | {meta['n_users']} |
| items | {meta['n_items']} |
| interactions | {meta['n_interactions']} |
| train / valid / test | {meta['n_train']} / {meta['n_valid']} / {meta['n_test']} |

## Files
- `ml100k.inter`: tab-separated `userID itemID x_label` (0 train, 1 valid, 2 test).
- `text_feat.npy`: float32 {meta['features']['text']}, row k = item k.
- `kg_feat.npy`: float32 {meta['features']['kg']}, row k = item k.
- `items.csv`: item_id, raw_item_id (MovieLens id), title, genres, sentence (the text encoded;
  `fettle-featurize-text --csv=items.csv --column=sentence --out=text_feat.npy`
  encodes it again).
- `users.csv`: user_id, raw_user_id.
- `metadata.json`: these counts and the kg statistics.

## Rules
- Every rating (1-5) is one implicit interaction; rating values and `ml-100k.user` are unused.
- Ids: raw user and item ids are mapped to 0..n-1 in increasing numeric order of the raw id
  (items: those with at least one interaction; all {meta['n_items']} have one).
- Split, per user: interactions sorted by (timestamp, item id); with n interactions,
  n_test = n_valid = max(1, (n + 5) // 10), i.e. n/10 rounded half up; the last n_test go to
  test, the n_valid before them to valid, the rest to train. Every user has at least
  {meta['min_user_interactions']} interactions, so each has train, valid and test interactions.
  An item may appear only in valid/test; it keeps its id.
- Text: one sentence per item, "<title> (<year>). Genres: <g1>, <g2>." from `ml-100k.item`.
  The year is appended only when it is a 4-digit year not already at the end of the title;
  item 267, whose fields hold the placeholder "unkonwn", is titled "Unknown title". Encoder:
  {encoder}. Example: "{example}"
- KG: from `ml-100k.link` (item -> Freebase entity) and `ml-100k.kg` (head, relation, tail).
  Only triples whose head is an item's entity are used, because many edges are also stored
  reversed (film.film.genre / film.film_genre.films_in_this_genre) and would count twice:
  {kg['n_triples_used']} triples, {kg['n_relations']} relations, {kg['n_tail_entities']} tail
  entities, {kg['n_columns_all']} (relation, tail) columns. Columns shared by fewer than
  {kg['min_df']} items are dropped ({kg['n_columns_kept']} columns, {kg['n_relations_kept']}
  relations kept). Multi-hot -> TF-IDF with idf = ln((1 + n_items) / (1 + df)) + 1 -> rows
  L2-normalized -> exact truncated SVD to {kg['svd_dim']} dims: eigendecomposition of the Gram
  matrix of the {kg['n_items_with_features']} items with a kept column, embedding = U * S, each
  component's sign chosen so its largest-magnitude entry is positive. The {kg['svd_dim']}
  components keep {100 * kg['svd_energy_kept']:.1f}% of the squared Frobenius norm. The
  {kg['n_items_filled_with_mean']} items with no kept column (no `.link` entry, or only unshared
  attributes) get the mean row of the others.
"""
