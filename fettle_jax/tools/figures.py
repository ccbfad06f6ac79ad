"""The paper's figures from finished runs: a PNG and a CSV of its numbers each.

  fettle-figures fig1 --runs=FREEDOM=runs/a,FREEDOM+FETTLE=runs/b --out=figs/
  fettle-figures fig5 --runs=FREEDOM=runs/a,FREEDOM+FETTLE=runs/b --out=figs/
  fettle-figures fig6 --runs=FREEDOM=runs/a,FREEDOM+FETTLE=runs/b --out=figs/
  fettle-figures fig4 --grid=runs/grid_theta --out=figs/
  fettle-figures fig8 --grid=runs/grid_bpr --x=fettle.alpha --y=fettle.beta \\
      --out=figs/

(`python scripts/figures.py ...` runs the same.)

fig1 (Sec 1): for each run (a finished workdir; its best checkpoint), the share of item
  pairs dissimilar in every modality (i less similar to j than to 90% of the items) that
  the final item representation ranks among i's top 10%, under two references for
  "modality": the run's own modality item embeddings (the paper's; backbones that have
  them) and the data set's content features (the same pairs for every run). Writes
  fig1.csv and fig1.png (with the chance level: 10%).
fig5 (Sec 4.5, needs scikit-learn: pip install -e '.[figures]'): 2-D t-SNE of the item
  embeddings of each modality (ID = the final item representation, and the backbone's own
  modality embeddings), one panel per run, the same --items sampled items in each; next to
  the mean cosine of each item's modality embeddings to its ID embedding (fig5.csv,
  fig5_points.csv, fig5.png).
fig6 (Sec 4.5): 2-D t-SNE of --users users (those with a median number of train items)
  with their train items' embeddings in every modality, one panel per run (fig6.csv,
  fig6.png).
fig4 (Sec 4.4): one-way vs bidirectional alignment over theta, from a folder of runs that
  differ in fettle.bidirectional_threshold (run.py --sweep=fettle.bidirectional_threshold=
  -1,0,0.25,...; negative = one-way, the reference line): test Recall@10 and @20, mean ±
  std over seeds. Writes fig4.csv and fig4.png; and, from the one-way runs' best
  parameters, the share of (item, modality) pairs whose Eq. 2 score (dot and cosine)
  exceeds each theta, of all pairs and per modality: fig4_share.csv (the plot: all pairs)
  and fig4_share.png.
fig8 (Sec 4.6): sensitivity heatmaps over two swept fields of a grid folder (run.py
  --sweep ...; any folder of runs whose metrics.json differ in those fields): validation
  and test Recall@20, mean over seeds. Writes fig8_<x>_<y>.csv and .png.
"""

import glob
import os
import sys

from absl import flags
from absl import logging
import numpy as np

from fettle_jax import figures
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import ConfigError
from fettle_jax.errors import REPORTED_ERRORS

FLAGS = flags.FlagValues()  # this tool's own flags (tests load it beside other tools)
_OUT = flags.DEFINE_string("out", "figures", "Folder for the PNG and CSV files.",
                           flag_values=FLAGS)
_RUNS = flags.DEFINE_list("runs", [], "fig1, fig5, fig6: LABEL=WORKDIR of each finished run.",
                          flag_values=FLAGS)
_GRID = flags.DEFINE_string("grid", None, "fig4, fig8: folder whose subfolders are runs.",
                            flag_values=FLAGS)
_X = flags.DEFINE_string("x", "fettle.alpha", "fig8: the field on the x axis.",
                         flag_values=FLAGS)
_Y = flags.DEFINE_string("y", "fettle.beta", "fig8: the field on the y axis.",
                         flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 1500, "fig5: items sampled (t-SNE cost grows with "
                              "the points: items x modalities).", flag_values=FLAGS)
_USERS = flags.DEFINE_integer("users", 6, "fig6: users shown.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "fig5, fig6: sampling and t-SNE seed.",
                             flag_values=FLAGS)
_METRIC = flags.DEFINE_string("metric", "recall@20", "fig8: the metric of both panels.",
                              flag_values=FLAGS)


def labelled_runs():
  """(label, workdir, run, its exported arrays) for each --runs entry."""
  from fettle_jax import export  # pylint: disable=g-import-not-at-top  # imports JAX
  for item in _RUNS.value:
    label, sep, workdir = item.partition("=")
    if not sep:
      raise ConfigError(f"--runs: expected LABEL=WORKDIR, got {item!r}")
    run = workdir_lib.load_run(workdir)
    yield label, workdir, run, export.embeddings(run)


def item_modalities(arrays: dict) -> dict:
  """{'ID': final items, <modality>: the backbone's own modality item embeddings}."""
  out = {"ID": arrays["items.npy"]}
  out.update({name[len("items_"):-len(".npy")]: a for name, a in sorted(arrays.items())
              if name.startswith("items_")})
  return out


def fig1(out: str) -> list:
  rows = []
  for label, workdir, run, arrays in labelled_runs():
    own = [a for name, a in sorted(arrays.items()) if name.startswith("items_")]
    references = {"content features": list(run.data.features.values())}
    if own:
      references["own modality embeddings"] = own
    for reference, modalities in references.items():
      counts = figures.false_positive_share(modalities, arrays["items.npy"])
      rows.append(dict(run=label, workdir=workdir, reference=reference,
                       test_recall20=run.metrics["test"]["recall@20"], **counts))
      print(f"{label}: {reference}: {counts['false_positives']} of "
            f"{counts['dissimilar_pairs']} dissimilar pairs ranked similar "
            f"({100 * counts['share']:.1f}%; chance {100 * counts['chance']:.1f}%)",
            flush=True)
  os.makedirs(out, exist_ok=True)
  columns = ["run", "reference", "dissimilar_pairs", "false_positives", "share", "chance",
             "test_recall20", "workdir"]
  with open(os.path.join(out, "fig1.csv"), "w") as f:
    f.write(",".join(columns) + "\n")
    for row in rows:
      f.write(",".join(str(row[c]) for c in columns) + "\n")
  labels = list(dict.fromkeys(row["run"] for row in rows))
  groups = {}
  for reference in dict.fromkeys(row["reference"] for row in rows):
    groups[f"dissimilar by {reference}"] = [
        next((r["share"] for r in rows if r["run"] == label and r["reference"] == reference),
             float("nan")) for label in labels]
  figures.bar_chart(os.path.join(out, "fig1.png"), labels, groups,
                    "share of dissimilar pairs ranked similar",
                    "False positives of the final item representation (Sec 1)",
                    {f"chance: share of all pairs ranked similar ({rows[0]['chance']:.3f})":
                     rows[0]["chance"]} if rows else None)
  return rows


def fig5(out: str) -> list:
  panels, rows, points = [], [], []
  sample = None
  for label, _, run, arrays in labelled_runs():
    modalities = item_modalities(arrays)
    if len(modalities) == 1:
      raise ConfigError(f"fig5: run {label!r} ({run.experiment.config.model}) has no modality "
                        "item embeddings; use a multi-modal backbone")
    if sample is None:
      rng = np.random.default_rng(_SEED.value)
      n_items = run.data.n_items
      sample = np.sort(rng.choice(n_items, size=min(_ITEMS.value, n_items), replace=False))
    names = list(modalities)
    xy = figures.tsne_2d(np.concatenate([modalities[m][sample] for m in names]), _SEED.value)
    group = np.repeat(names, len(sample))
    cosines = figures.modality_cosines(modalities["ID"], {m: modalities[m] for m in names[1:]})
    rows += [(label, m, c) for m, c in cosines.items()]
    points += [(label, item, m, x, y) for (x, y), m, item
               in zip(xy, group, np.tile(sample, len(names)))]
    detail = ", ".join(f"cos(ID, {m}) {c:.3f}" for m, c in cosines.items())
    panels.append((f"{label}\n{detail}", xy, group, ["item"] * len(group)))
    print(f"{label}: {detail}", flush=True)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fig5.csv"), "w") as f:
    f.write("run,modality,mean_cosine_to_id\n")
    f.writelines(f"{r},{m},{c:.6f}\n" for r, m, c in rows)
  with open(os.path.join(out, "fig5_points.csv"), "w") as f:
    f.write("run,item,modality,x,y\n")
    f.writelines(f"{r},{i},{m},{x:.4f},{y:.4f}\n" for r, i, m, x, y in points)
  figures.scatter_panels(os.path.join(out, "fig5.png"), panels,
                         f"t-SNE of {len(sample)} items' embeddings per modality (Sec 4.5)")
  return rows


def typical_users(train_pairs: np.ndarray, n_users: int, count: int) -> np.ndarray:
  """The `count` users whose number of train items is closest to the median (ties: lower
  id): readable clouds, unlike the most active users' hundreds of items."""
  degree = np.bincount(train_pairs[:, 0], minlength=n_users)
  distance = np.abs(degree - np.median(degree[degree > 0]))
  distance[degree == 0] = np.inf
  return np.argsort(distance, kind="stable")[:count]


def fig6(out: str) -> list:
  panels, points = [], []
  for label, _, run, arrays in labelled_runs():
    users = typical_users(run.data.train, run.data.n_users, _USERS.value)
    modalities = item_modalities(arrays)
    vectors, colour, marker = [], [], []
    for user in users:
      items = run.data.train[run.data.train[:, 0] == user, 1]
      vectors.append(arrays["users.npy"][user][None])
      colour.append(f"user {user}")
      marker.append("user")
      for name, table in modalities.items():
        vectors.append(table[items])
        colour += [f"user {user}"] * len(items)
        marker += [f"item {name}"] * len(items)
    xy = figures.tsne_2d(np.concatenate(vectors), _SEED.value)
    points += [(label, c, m, x, y) for (x, y), c, m in zip(xy, colour, marker)]
    panels.append((label, xy, colour, marker))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fig6.csv"), "w") as f:
    f.write("run,user,point,x,y\n")
    f.writelines(f"{r},{c},{m},{x:.4f},{y:.4f}\n" for r, c, m, x, y in points)
  figures.scatter_panels(os.path.join(out, "fig6.png"), panels,
                         f"t-SNE of {_USERS.value} users and their train items' modality "
                         "embeddings (Sec 4.5)", large=("user",))
  return points


def grid_runs() -> list:
  """(folder, metrics.json) of every run folder under --grid."""
  files = sorted(glob.glob(os.path.join(_GRID.value, "*", "metrics.json")))
  if not files:
    raise ConfigError(f"--grid={_GRID.value}: no */metrics.json there")
  # An unreadable metrics.json, or one without its config, is a one-line RunFolderError.
  return [(os.path.dirname(file), workdir_lib.read_metrics(os.path.dirname(file)))
          for file in files]


def grid_results() -> list:
  """metrics.json of every run folder under --grid."""
  return [result for _, result in grid_runs()]


def feedback_above(workdir: str, thetas) -> dict:
  """{kind: {modality: [share with s_i^m > theta for each theta]}}: Eq. 2 over every item's
  train users (items with one), from the run's best parameters, by both choices of
  config.fettle.feedback; the share a bidirectional threshold theta reaches, of all (item,
  modality) pairs ('all') and per modality m."""
  from fettle_jax.alignment import modalities  # pylint: disable=g-import-not-at-top  # JAX
  run = workdir_lib.load_run(workdir)
  reps = workdir_lib.represent(run)
  projectors = run.params["alignment"]["projectors"]
  names = modalities.modality_names(list(projectors))
  items = np.asarray(modalities.all_item_modality_embeddings(
      projectors, reps, run.experiment.static.features, names,
      run.experiment.config.fettle.use_backbone_modalities))
  has_users = np.bincount(run.data.train[:, 1], minlength=run.data.n_items) > 0
  shares = {}
  for kind in ("dot", "cosine"):
    scores = figures.feedback_scores(np.asarray(reps.users), items, run.data.train,
                                     kind)[has_users]
    shares[kind] = {"all": [float(np.mean(scores > theta)) for theta in thetas]}
    shares[kind].update({name: [float(np.mean(scores[:, m] > theta)) for theta in thetas]
                         for m, name in enumerate(names)})
  return shares


THETA = "fettle.bidirectional_threshold"
FIG4_THETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the paper's Fig. 4 axis


def fig4(out: str) -> dict:
  runs = grid_runs()
  results = [result for _, result in runs]
  one_way = [r for r in results if figures.config_field(r, THETA) < 0]
  both = [r for r in results if figures.config_field(r, THETA) >= 0]
  if not one_way or not both:
    raise ConfigError(f"--grid={_GRID.value}: fig4 needs runs with {THETA} < 0 (one-way) "
                      f"and >= 0 (bidirectional); found {len(one_way)} and {len(both)}")
  series, reference, rows = {}, {}, []
  for metric in ("test recall@10", "test recall@20"):
    xs, mean, std, count = figures.sweep_series(both, THETA, metric)
    series[f"bidirectional where s > theta: {metric}"] = (xs, mean, std)
    values = [r["test"][metric.split(" ")[1]] for r in one_way]
    reference[f"one-way (FETTLE): {metric}"] = (float(np.mean(values)), float(np.std(values)))
    rows += [(metric, "bidirectional", x, m, s, c) for x, m, s, c in zip(xs, mean, std, count)]
    rows.append((metric, "one-way", "", np.mean(values), np.std(values), len(values)))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fig4.csv"), "w") as f:
    f.write("metric,alignment,theta,mean,std,seeds\n")
    f.writelines(f"{m},{a},{x},{mean:.6f},{std:.6f},{c}\n" for m, a, x, mean, std, c in rows)
  config = results[0]["config"]
  figures.line_chart(os.path.join(out, "fig4.png"), "theta (bidirectional threshold)",
                     series, "test metric (mean ± std over seeds)",
                     f"{config['model']} + FETTLE: one-way vs bidirectional alignment "
                     "(Sec 4.4)", reference)
  print(f"wrote {os.path.join(out, 'fig4.png')} and .csv", flush=True)
  # How many items a threshold reaches: the one-way runs' Eq. 2 scores against the thetas.
  thetas = sorted(set(FIG4_THETAS) | {float(x) for x in series[next(iter(series))][0]})
  folders = [folder for folder, result in runs if figures.config_field(result, THETA) < 0]
  if not all(os.path.isdir(workdir_lib.best_checkpoint_dir(f)) for f in folders):
    print("fig4_share: skipped (a one-way run has no best checkpoint)", flush=True)
    return series
  shares = [feedback_above(folder, thetas) for folder in folders]
  share_series = {}
  with open(os.path.join(out, "fig4_share.csv"), "w") as f:
    f.write("feedback,modality,theta,share_mean,share_std,runs\n")
    for kind in ("dot", "cosine"):
      for modality in shares[0][kind]:
        values = np.array([s[kind][modality] for s in shares])  # [runs, thetas]
        mean, std = values.mean(axis=0), values.std(axis=0)
        f.writelines(f"{kind},{modality},{t:g},{m:.6f},{d:.6f},{len(shares)}\n"
                     for t, m, d in zip(thetas, mean, std))
        if modality == "all":
          share_series[f"s_i^m by {kind} (Eq. 2)"] = (thetas, mean, std)
  figures.line_chart(os.path.join(out, "fig4_share.png"), "theta", share_series,
                     "share of (item, modality) pairs with s_i^m > theta",
                     f"{config['model']} + FETTLE (one-way runs, trained with "
                     f"{config['fettle'].get('feedback', 'dot')} feedback): items a "
                     "bidirectional threshold reaches", None)
  print(f"wrote {os.path.join(out, 'fig4_share.png')} and .csv", flush=True)
  return series


def fig8(out: str) -> dict:
  results = grid_results()
  x, y = _X.value, _Y.value
  panels = {f"{split} {_METRIC.value}": figures.grid_table(results, x, y,
                                                           f"{split} {_METRIC.value}")
            for split in ("valid", "test")}
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, f"fig8_{x.split('.')[-1]}_{y.split('.')[-1]}")
  figures.write_grid_csv(stem + ".csv", x, y, panels)
  config = results[0]["config"]
  figures.heatmap(stem + ".png", x, y, panels,
                  f"{config['model']} + {config['alignment']}: sensitivity to {x} and {y} "
                  f"({len(results)} runs)")
  print(f"wrote {stem}.png and .csv", flush=True)
  return panels


def main(argv) -> int:
  """The command line; returns the exit status (errors: one `error:` line, status 1)."""
  command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
  if not workdir_lib.parse_flags(FLAGS, [argv[0]] + argv[2 if command else 1:], __doc__,
                                 required=()):
    return 0
  logging.set_verbosity(logging.WARNING)
  try:
    if command == "fig1":
      if not _RUNS.value:
        raise ConfigError("fig1 needs --runs=LABEL=WORKDIR,...")
      fig1(_OUT.value)
    elif command in ("fig5", "fig6"):
      if not _RUNS.value:
        raise ConfigError(f"{command} needs --runs=LABEL=WORKDIR,...")
      (fig5 if command == "fig5" else fig6)(_OUT.value)
    elif command == "fig4":
      if not _GRID.value:
        raise ConfigError("fig4 needs --grid=FOLDER")
      fig4(_OUT.value)
    elif command == "fig8":
      if not _GRID.value:
        raise ConfigError("fig8 needs --grid=FOLDER")
      fig8(_OUT.value)
    else:
      raise ConfigError(f"usage: {os.path.basename(argv[0])} fig1|fig4|fig5|fig6|fig8 [flags] (got "
                        f"{command!r}; see --help)")
  except REPORTED_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def cli():
  """The `fettle-figures` console script."""
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  cli()
