"""fettle_jax/figures.py and fettle-figures (fettle_jax/tools/figures.py): Fig. 1's
false-positive count against a brute-force NumPy reference written from the definition,
planted cases, and Fig. 8's grid heatmap from run folders."""

import csv
import json
import os

import numpy as np
import pytest

from fettle_jax import figures
from fettle_jax.tools import figures as figures_tool


def reference_false_positives(modalities, final, dissimilar=0.1, similar=0.9):
  """Triple loop: for each ordered pair (i, j), i != j, count the other items k != i that
  are less cosine-similar to i than j is, per embedding."""
  def cos(x, i, j):
    return x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))

  def share_below(x, i, j):
    others = [k for k in range(len(x)) if k != i]
    return sum(cos(x, i, k) < cos(x, i, j) for k in others) / len(others)

  n = len(final)
  pairs = fps = similar_pairs = 0
  for i in range(n):
    for j in range(n):
      if i == j:
        continue
      is_similar = share_below(final, i, j) >= similar
      similar_pairs += is_similar
      if all(share_below(m, i, j) < dissimilar for m in modalities):
        pairs += 1
        fps += is_similar
  return pairs, fps, similar_pairs / (n * (n - 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_false_positive_share_equals_the_brute_force_count(seed):
  rng = np.random.default_rng(seed)
  n = 23
  modalities = [rng.normal(size=(n, 4)), rng.normal(size=(n, 3))]
  final = rng.normal(size=(n, 5))
  # Loose thresholds so that the tiny example has pairs in every category.
  got = figures.false_positive_share(modalities, final, dissimilar=0.4, similar=0.6)
  pairs, fps, chance = reference_false_positives(modalities, final, 0.4, 0.6)
  assert pairs > 0 and fps > 0
  assert (got["dissimilar_pairs"], got["false_positives"]) == (pairs, fps)
  assert got["share"] == pytest.approx(fps / pairs)
  assert got["chance"] == pytest.approx(chance)


def test_planted_representations():
  rng = np.random.default_rng(3)
  modality = rng.normal(size=(60, 8))
  # The final representation is the modality itself: a dissimilar pair is never similar.
  assert figures.false_positive_share([modality], modality)["false_positives"] == 0
  # A final representation unrelated to the modality: about the chance level, ~10% of the
  # ordered pairs being in the top 10%.
  unrelated = figures.false_positive_share([modality], rng.normal(size=(60, 8)))
  assert unrelated["dissimilar_pairs"] == 60 * 6  # 6 of each item's 59 others: < 10%
  assert unrelated["chance"] == pytest.approx(0.1, abs=0.02)
  assert unrelated["share"] == pytest.approx(unrelated["chance"], abs=0.05)
  with pytest.raises(ValueError, match="rows"):
    figures.false_positive_share([modality[:5]], modality)


def fake_run(folder, alpha, beta, seed, valid, test, theta=-1.0):
  os.makedirs(folder)
  with open(os.path.join(folder, "metrics.json"), "w") as f:
    json.dump({"config": {"model": "bpr", "alignment": "fettle", "seed": seed,
                          "fettle": {"alpha": alpha, "beta": beta,
                                     "bidirectional_threshold": theta}},
               "data": {"name": "fake"}, "valid": {"recall@20": valid},
               "test": {"recall@20": test, "recall@10": test / 2}}, f)


def test_fig8_heatmap_from_a_grid_folder(tmp_path):
  grid = tmp_path / "grid"
  for a in (1e-4, 1e-3):
    for b in (1e-3, 1e-2, 1e-1):
      for seed in (0, 1):
        fake_run(str(grid / f"seed{seed}_a{a}_b{b}"), a, b, seed, valid=a * 100 + b + seed,
                 test=b)
  assert figures_tool.main(["figures.py", "fig8", f"--grid={grid}",
                            f"--out={tmp_path / 'figs'}"]) == 0
  assert (tmp_path / "figs" / "fig8_alpha_beta.png").stat().st_size > 10_000
  with open(tmp_path / "figs" / "fig8_alpha_beta.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 6  # two panels x 6 cells
  cell = [r for r in rows if r["metric"] == "valid recall@20" and
          float(r["fettle.alpha"]) == 1e-3 and float(r["fettle.beta"]) == 1e-2][0]
  assert float(cell["mean"]) == pytest.approx(0.1 + 0.01 + 0.5) and cell["seeds"] == "2"
  xs, ys, mean, count = figures.grid_table(
      [json.load(open(p)) for p in grid.glob("*/metrics.json")], "fettle.alpha",
      "fettle.beta", "test recall@20")
  assert xs == [1e-4, 1e-3] and ys == [1e-3, 1e-2, 1e-1]
  np.testing.assert_allclose(mean, [[1e-3] * 2, [1e-2] * 2, [1e-1] * 2])
  assert (count == 2).all()


def test_fig4_one_way_against_bidirectional_over_theta(tmp_path):
  grid = tmp_path / "grid"
  for seed in (0, 1):
    fake_run(str(grid / f"one_way_{seed}"), 1e-3, 1e-3, seed, 0.5, 0.30 + 0.02 * seed)
    for theta in (0.0, 0.5, 0.9):
      fake_run(str(grid / f"theta{theta}_{seed}"), 1e-3, 1e-3, seed, 0.5, theta / 10 + seed,
               theta=theta)
  assert figures_tool.main(["figures.py", "fig4", f"--grid={grid}", f"--out={tmp_path}"]) == 0
  assert (tmp_path / "fig4.png").stat().st_size > 10_000
  with open(tmp_path / "fig4.csv") as f:
    rows = list(csv.DictReader(f))
  one_way = [r for r in rows if r["alignment"] == "one-way" and r["metric"] == "test recall@20"]
  assert float(one_way[0]["mean"]) == pytest.approx(0.31)
  assert float(one_way[0]["std"]) == pytest.approx(0.01) and one_way[0]["seeds"] == "2"
  theta = [r for r in rows if r["alignment"] == "bidirectional" and
           r["metric"] == "test recall@10" and float(r["theta"]) == 0.9][0]
  assert float(theta["mean"]) == pytest.approx((0.09 + 1.09) / 2 / 2)


def test_fig4_share_of_items_above_theta_from_trained_runs(tiny_mmrec, tmp_path):
  """The share file from a real one-way run: Eq. 2 recomputed here from its exported
  parameters, by both feedback choices, against the CSV."""
  from fettle_jax import train  # pylint: disable=g-import-not-at-top
  from fettle_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from fettle_jax.alignment import modalities  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  grid = tmp_path / "grid"
  config = tiny_config(tiny_mmrec, "bpr", "fettle")
  config.max_epochs = 2
  train.train_and_evaluate(config, str(grid / "one_way"))
  fake_run(str(grid / "theta0.5"), 1e-3, 1e-3, 0, 0.5, 0.3, theta=0.5)
  assert figures_tool.main(["figures.py", "fig4", f"--grid={grid}", f"--out={tmp_path}"]) == 0
  with open(tmp_path / "fig4_share.csv") as f:
    rows = {(r["feedback"], r["modality"], float(r["theta"])): float(r["share_mean"])
            for r in csv.DictReader(f)}
  assert set(t for _, _, t in rows) == set(figures_tool.FIG4_THETAS) | {0.5}
  run = workdir_lib.load_run(str(grid / "one_way"))
  reps = workdir_lib.represent(run)
  projectors = run.params["alignment"]["projectors"]
  items = np.asarray(modalities.all_item_modality_embeddings(
      projectors, reps, run.experiment.static.features,
      modalities.modality_names(list(projectors)), False))
  users = np.asarray(reps.users)
  names = modalities.modality_names(list(projectors))
  for kind in ("dot", "cosine"):
    scores = []  # [items with a train user, modalities]
    for item in np.unique(run.data.train[:, 1]):
      its_users = users[run.data.train[run.data.train[:, 1] == item, 0]]
      row = []
      for m in range(items.shape[1]):
        x = its_users @ items[item, m]
        if kind == "cosine":
          x = x / np.linalg.norm(its_users, axis=1) / np.linalg.norm(items[item, m])
        row.append(x.mean())
      scores.append(row)
    scores = np.array(scores)
    for theta in (0.0, 0.5, 0.9):
      assert rows[(kind, "all", theta)] == pytest.approx(np.mean(scores > theta), abs=0.02)
      for m, name in enumerate(names):
        assert rows[(kind, name, theta)] == pytest.approx(np.mean(scores[:, m] > theta),
                                                          abs=0.02)


def test_figures_command_line_errors_are_one_line(tmp_path, capsys):
  fake_run(str(tmp_path / "one_way" / "run"), 1e-3, 1e-3, 0, 0.5, 0.3)
  os.makedirs(tmp_path / "torn" / "run")
  (tmp_path / "torn" / "run" / "metrics.json").write_text("{cut short")
  for argv, message in [(["figures.py", "fig4", f"--grid={tmp_path / 'torn'}"],
                         "metrics.json: unreadable (JSONDecodeError"),(["figures.py"], "usage: figures.py fig1|fig4|fig5|fig6|fig8"),
                        (["figures.py", "fig4", f"--grid={tmp_path / 'one_way'}"], "found 1 and 0"),
                        (["figures.py", "fig8"], "fig8 needs --grid"),
                        (["figures.py", "fig8", f"--grid={tmp_path}"], "no */metrics.json"),
                        (["figures.py", "fig1"], "fig1 needs --runs"),
                        (["figures.py", "fig1", "--runs=nolabel"], "expected LABEL=WORKDIR"),
                        (["figures.py", "fig1", f"--runs=a={tmp_path}/none"], "none")]:
    assert figures_tool.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_feedback_scores_and_direction_agreement_against_loops():
  rng = np.random.default_rng(4)
  n_users, n_items, dim = 7, 6, 3
  users = rng.normal(size=(n_users, dim))
  items = rng.normal(size=(n_items, 3, dim))
  pairs = np.array([(u, i) for u in range(n_users) for i in range(n_items - 1)
                    if rng.random() < 0.5] + [(0, 0)])
  got = figures.feedback_scores(users, items, pairs)
  for i in range(n_items):
    its_users = [u for u, j in pairs if j == i]
    for m in range(3):
      want = np.mean([users[u] @ items[i, m] for u in its_users]) if its_users else 0.0
      assert got[i, m] == pytest.approx(want, rel=1e-5, abs=1e-6)  # float32, as in training
  cosines = figures.feedback_scores(users, items, pairs, kind="cosine")
  for i in range(n_items):
    its_users = [u for u, j in pairs if j == i]
    for m in range(3):
      want = np.mean([users[u] @ items[i, m] / np.linalg.norm(users[u])
                      / np.linalg.norm(items[i, m]) for u in its_users]) if its_users else 0.0
      assert cosines[i, m] == pytest.approx(want, rel=1e-5, abs=1e-6)
  # Agreement: the cleaner modality (smaller planted noise) has the higher score.
  scores_a, scores_b = np.array([1.0, 0.0, 2.0, 0.0]), np.array([0.0, 1.0, 1.0, 3.0])
  noise_a, noise_b = np.array([0.1, 0.1, 2.0, 2.0]), np.array([2.0, 2.0, 0.1, 0.1])
  mixed = np.array([True, True, True, False])
  out = figures.planted_direction_agreement(scores_a, scores_b, noise_a, noise_b, mixed)
  # item 0: a cleaner, a higher: agrees; 1: a cleaner, b higher: no; 2: b cleaner, a
  # higher: no; 3 (not mixed): b cleaner, b higher: agrees.
  assert out == {"mixed_items": 3, "agreement_mixed": pytest.approx(1 / 3),
                 "agreement_all": 0.5}
