"""The paper's figures as numbers and plots: pure functions of arrays and run results
(fettle-figures, fettle_jax/tools/figures.py, does the I/O). Every plot is written next
to a CSV of its numbers.

- `false_positive_share` (Fig. 1, Sec 1): of the item pairs that are dissimilar in every
  modality, the share the final item representation ranks as similar.
- `sweep_series` + `line_chart` (Fig. 4, Sec 4.4): a metric over one swept field (the
  bidirectional threshold theta), one-way alignment as the reference line.
- `tsne_2d`, `modality_cosines` + `scatter_panels` (Fig. 5, 6, Sec 4.5): 2-D t-SNE
  (scikit-learn, the `figures` extra) of item embeddings per modality, or of users with
  their items' modality embeddings, before and after alignment.
- `feedback_scores` + `planted_direction_agreement` (the direction study on the synthetic
  twins): how often Eq. 5's direction points from an item's noisy modality to its clean one.
- `grid_table` + `heatmap` (Fig. 8, Sec 4.6): a metric's mean over seeds on a 2-D grid
  of two hyper-parameters.
Plots use matplotlib's Agg canvas directly (no global backend, no display).
"""

import csv
from typing import Dict, List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from fettle_jax.alignment.fettle import equations


def _cosine(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.where(norms > 0, norms, 1.0)
  return x @ x.T


def similarity_ranks(embeddings: np.ndarray) -> np.ndarray:
  """[n, n]: entry (i, j) is the share of the other items k != i that are less
  cosine-similar to i than j is (0 = j is i's least similar item, (n-2)/(n-1) = its most
  similar). The diagonal is -1 (an item is not its own neighbour)."""
  similarity = _cosine(embeddings)
  n = similarity.shape[0]
  np.fill_diagonal(similarity, -np.inf)  # ranks 0 on the diagonal; others 1..n-1
  ranks = np.argsort(np.argsort(similarity, axis=1, kind="stable"), axis=1, kind="stable")
  share = (ranks - 1) / max(n - 1, 1)
  np.fill_diagonal(share, -1.0)
  return share


def false_positive_share(modalities: Sequence[np.ndarray], final: np.ndarray,
                         dissimilar: float = 0.1, similar: float = 0.9) -> Dict[str, float]:
  """Fig. 1's count. A pair (i, j) is dissimilar in a modality when fewer than `dissimilar`
  of the other items are less similar to i than j is (i is less similar to j than to 90%
  of all items, the paper's definition), in every modality at once; the final
  representation ranks it as similar when at least `similar` of the others are less
  similar (j is in i's top 10%). Ordered pairs (i's view of j), self-pairs excluded.

  Returns dissimilar_pairs, false_positives, share (false_positives / dissimilar_pairs)
  and chance: the share a representation unrelated to the modalities would give (the
  fraction of pairs ranked as similar at all)."""
  if not modalities:
    raise ValueError("false_positive_share needs at least one modality")
  n = final.shape[0]
  for m in modalities:
    if m.shape[0] != n:
      raise ValueError(f"modality embeddings have {m.shape[0]} rows, the final ones {n}")
  in_every = np.ones((n, n), bool)
  for embeddings in modalities:
    rank = similarity_ranks(embeddings)
    in_every &= (rank >= 0) & (rank < dissimilar)
  final_rank = similarity_ranks(final)
  ranked_similar = final_rank >= similar
  pairs = int(in_every.sum())
  false_positives = int((in_every & ranked_similar).sum())
  return {"dissimilar_pairs": pairs, "false_positives": false_positives,
          "share": false_positives / pairs if pairs else float("nan"),
          "chance": float(ranked_similar.sum()) / (n * (n - 1))}


def config_field(result: dict, dotted: str) -> float:
  """A run's config value at a dotted name, e.g. 'fettle.alpha', from its metrics.json."""
  value = result["config"]
  for part in dotted.split("."):
    value = value[part]
  return float(value)


def sweep_series(results: Sequence[dict], field: str, metric: str
                 ) -> Tuple[List[float], np.ndarray, np.ndarray, np.ndarray]:
  """(values of `field`, mean, std, seeds) of `metric` ('test recall@20') per value."""
  split, name = metric.split(" ", 1)
  groups: Dict[float, List[float]] = {}
  for result in results:
    groups.setdefault(config_field(result, field), []).append(result[split][name])
  xs = sorted(groups)
  return (xs, np.array([np.mean(groups[x]) for x in xs]),
          np.array([np.std(groups[x]) for x in xs]), np.array([len(groups[x]) for x in xs]))


def line_chart(path: str, xlabel: str, series: Dict[str, tuple], ylabel: str, title: str,
               reference: Dict[str, Tuple[float, float]] = None) -> None:
  """Lines with ±std bands: series name -> (xs, mean, std); dashed reference lines with
  their ±std band: name -> (mean, std); with one reference per series the i-th takes the
  i-th series' colour, else gray."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(7.5, 4.6), dpi=100)
  FigureCanvasAgg(figure)
  ax = figure.subplots()
  for i, (name, (xs, mean, std)) in enumerate(series.items()):
    ax.plot(xs, mean, "o-", color=f"C{i}", label=name)
    ax.fill_between(xs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
  paired = len(reference or {}) == len(series)  # one reference per series: same colour
  for i, (name, (mean, std)) in enumerate((reference or {}).items()):
    color = f"C{i}" if paired else "gray"
    ax.axhline(mean, color=color, linestyle="--", label=name)
    ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)
  ax.set(xlabel=xlabel, ylabel=ylabel)
  ax.set_title(title, fontsize=11)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path)


def tsne_2d(points: np.ndarray, seed: int = 0) -> np.ndarray:
  """[n, 2] t-SNE of `points` [n, L] (scikit-learn; PCA init, so runs are comparable)."""
  try:
    from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("t-SNE figures need scikit-learn: pip install -e '.[figures]'") from None
  points = np.asarray(points, np.float64)
  perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
  return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity
              ).fit_transform(points)


def modality_cosines(reference: np.ndarray, others: Dict[str, np.ndarray]) -> Dict[str, float]:
  """Mean over items of cos(reference_i, other_i) per modality: how close each item's
  modality embeddings sit to its reference (ID) embedding, the number behind Fig. 5."""
  ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
  out = {}
  for name, emb in others.items():
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out[name] = float(np.mean(np.sum(ref * emb, axis=1)))
  return out


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def scatter_panels(path: str, panels: Sequence[tuple], title: str,
                   large: Sequence[str] = ()) -> None:
  """One scatter per panel (title, xy [n, 2], colour group per point, marker group per
  point); colours and markers keep their meaning across panels; one shared legend. Marker
  groups in `large` are drawn as big black-edged stars (e.g. the users of Fig. 6)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  colours = list(dict.fromkeys(c for _, _, cs, _ in panels for c in cs))
  markers = list(dict.fromkeys(m for _, _, _, ms in panels for m in ms))
  figure = Figure(figsize=(5.4 * len(panels) + 2.2, 5.0), dpi=100)
  FigureCanvasAgg(figure)
  axes = np.atleast_1d(figure.subplots(1, len(panels)))
  for ax, (panel_title, xy, colour_of, marker_of) in zip(axes, panels):
    colour_of, marker_of = np.asarray(colour_of), np.asarray(marker_of)
    for c, colour in enumerate(colours):
      for m, marker in enumerate(markers):
        chosen = (colour_of == colour) & (marker_of == marker)
        if chosen.any() and marker in large:
          ax.scatter(xy[chosen, 0], xy[chosen, 1], s=220, color=f"C{c % 10}", marker="*",
                     edgecolors="black", linewidths=0.8, zorder=3)
        elif chosen.any():
          ax.scatter(xy[chosen, 0], xy[chosen, 1], s=10 if len(xy) > 500 else 28,
                     color=f"C{c % 10}", marker=MARKERS[m % len(MARKERS)], alpha=0.6,
                     linewidths=0)
    ax.set_title(panel_title, fontsize=10)
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
  handles = ([Line2D([], [], color=f"C{c % 10}", marker="o", linestyle="", label=colour)
              for c, colour in enumerate(colours)] if len(colours) > 1 else [])
  handles += ([Line2D([], [], color="gray", linestyle="", label=marker,
                      marker="*" if marker in large else MARKERS[m % len(MARKERS)])
               for m, marker in enumerate(markers)]
              if len(markers) > 1 else [])
  figure.legend(handles=handles, loc="center right", fontsize=8)
  figure.suptitle(title)
  figure.tight_layout(rect=(0, 0, 1 - 2.0 / figure.get_figwidth(), 1))
  figure.savefig(path)


def feedback_scores(users: np.ndarray, item_modalities: np.ndarray,
                    train_pairs: np.ndarray, kind: str = "dot") -> np.ndarray:
  """s_i^m (Eq. 2) over all of an item's train users instead of a batch's: FETTLE's own
  `estimated_feedback` (`kind` dot or cosine, as config.fettle.feedback), with every item
  as one slot and every train pair as the batch. users [n_users, L], item_modalities
  [n_items, |M|, L], train_pairs int [n, 2] (user, item). Items without a train user: 0."""
  n_items = item_modalities.shape[0]
  pair_users, pair_items = np.asarray(train_pairs).T
  counts = np.bincount(pair_items, minlength=n_items)
  scores = equations.estimated_feedback(jnp.asarray(users)[pair_users],
                                        jnp.asarray(item_modalities), jnp.asarray(pair_items),
                                        jnp.asarray(counts), kind)
  return np.asarray(scores)


def planted_direction_agreement(scores_a: np.ndarray, scores_b: np.ndarray,
                                noise_a: np.ndarray, noise_b: np.ndarray,
                                mixed: np.ndarray) -> Dict[str, float]:
  """Eq. 5 aligns the lower-scored modality of a pair to the higher-scored one. Agreement:
  the direction points from the noisier modality (larger planted noise) to the cleaner one,
  i.e. the cleaner one has the higher score. Returned over the `mixed` items (one modality
  clean, the other noisy: where the direction matters) and over all items."""
  cleaner_a = noise_a < noise_b
  a_higher = scores_a > scores_b
  agree = cleaner_a == a_higher
  return {"mixed_items": int(mixed.sum()),
          "agreement_mixed": float(agree[mixed].mean()) if mixed.any() else float("nan"),
          "agreement_all": float(agree.mean())}


def grid_table(results: Sequence[dict], x: str, y: str, metric: str
               ) -> Tuple[List[float], List[float], np.ndarray, np.ndarray]:
  """(x values, y values, mean [len(y), len(x)], seeds per cell) of `metric` over the runs'
  metrics.json contents, grouped by their config's dotted fields `x` and `y`.
  `metric` is e.g. 'test recall@20' or 'valid recall@20'. Cells with no run are NaN."""
  split, name = metric.split(" ", 1)
  cells: Dict[Tuple[float, float], List[float]] = {}
  for result in results:
    key = (config_field(result, x), config_field(result, y))
    cells.setdefault(key, []).append(result[split][name])
  xs = sorted({k[0] for k in cells})
  ys = sorted({k[1] for k in cells})
  mean = np.full((len(ys), len(xs)), np.nan)
  count = np.zeros((len(ys), len(xs)), int)
  for (vx, vy), values in cells.items():
    mean[ys.index(vy), xs.index(vx)] = np.mean(values)
    count[ys.index(vy), xs.index(vx)] = len(values)
  return xs, ys, mean, count


def write_grid_csv(path: str, x: str, y: str, panels: Dict[str, tuple]) -> None:
  """One row per (panel metric, x, y): mean and number of seeds."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["metric", x, y, "mean", "seeds"])
    for metric, (xs, ys, mean, count) in panels.items():
      for r, vy in enumerate(ys):
        for c, vx in enumerate(xs):
          writer.writerow([metric, vx, vy, "" if np.isnan(mean[r, c]) else
                           f"{mean[r, c]:.6f}", count[r, c]])


def heatmap(path: str, x: str, y: str, panels: Dict[str, tuple], title: str) -> None:
  """One heatmap per metric (annotated cells). The cell with the best value of the FIRST
  panel (put validation first) is boxed in every panel: selection by validation only."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(5.2 * len(panels), 4.4), dpi=100)
  FigureCanvasAgg(figure)
  axes = np.atleast_1d(figure.subplots(1, len(panels)))
  first = next(iter(panels.values()))[2]
  best_r, best_c = np.unravel_index(np.argmax(np.where(np.isnan(first), -np.inf, first)),
                                    first.shape)
  for ax, (metric, (xs, ys, mean, count)) in zip(axes, panels.items()):
    image = ax.imshow(mean, origin="lower", cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=ax, label=f"{metric} (mean over seeds)")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set(xlabel=x, ylabel=y, title=metric)
    spread = np.nanmax(mean) - np.nanmin(mean)
    for r in range(len(ys)):
      for c in range(len(xs)):
        if not np.isnan(mean[r, c]):
          light = spread > 0 and mean[r, c] < np.nanmin(mean) + 0.5 * spread
          ax.text(c, r, f"{mean[r, c]:.4f}\n({count[r, c]} seeds)", ha="center",
                  va="center", fontsize=8, color="white" if light else "black")
    ax.add_patch(Rectangle((best_c - 0.5, best_r - 0.5), 1, 1, fill=False, edgecolor="red",
                           linewidth=2))
  figure.suptitle(f"{title}\nred box: best {next(iter(panels))}")
  figure.tight_layout()
  figure.savefig(path)


def bar_chart(path: str, labels: Sequence[str], groups: Dict[str, Sequence[float]],
              ylabel: str, title: str, reference: Dict[str, float] = None) -> None:
  """Grouped bars: one group per label, one bar per `groups` key; optional horizontal
  reference lines (e.g. the chance level)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(max(7.5, 1.6 * len(labels) * len(groups)), 4.6), dpi=100)
  FigureCanvasAgg(figure)
  ax = figure.subplots()
  width = 0.8 / len(groups)
  for g, (name, values) in enumerate(groups.items()):
    positions = np.arange(len(labels)) + (g - (len(groups) - 1) / 2) * width
    bars = ax.bar(positions, values, width, label=name)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
  for name, value in (reference or {}).items():
    ax.axhline(value, color="gray", linestyle="--", label=name)
  ax.set_xticks(range(len(labels)), labels)
  top = max([v for values in groups.values() for v in values if np.isfinite(v)]
            + list((reference or {}).values()) + [1e-3])
  ax.set_ylim(0, 1.35 * top)  # room for the legend above the bars
  ax.set(ylabel=ylabel)
  ax.set_title(title, fontsize=11)
  ax.legend(loc="upper left", fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  figure.tight_layout()
  figure.savefig(path)
