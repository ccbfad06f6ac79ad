"""After training: recommendations, embedding export and learning curves of a finished run.

One tiny FREEDOM run (it has modality item embeddings) is trained per module; every test
reads it. References are computed here from the data arrays, independently of the tools.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from data_pipeline import dataset as dataset_lib
from data_pipeline import mmrec_writer
from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import export
from fettle_jax import recommend
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.types import ProjectedRows
from tests.conftest import make_interactions, tiny_config

N_USERS, N_ITEMS = 40, 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run; the data folder has MMRec's id-mapping files."""
  root = tmp_path_factory.mktemp("after_training")
  users, items, labels = make_interactions(N_USERS, N_ITEMS)
  rng = np.random.default_rng(1)
  features = {"image": rng.normal(size=(N_ITEMS, 12)).astype(np.float32),
              "text": rng.normal(size=(N_ITEMS, 6)).astype(np.float32)}
  data = str(root / "tiny")
  mmrec_writer.write_mmrec(data, "tiny", users, items, labels, features)
  with open(os.path.join(data, "u_id_mapping.csv"), "w") as f:  # MMRec: original \t new
    f.write("user_id\tuserID\n" + "".join(f"A{u:03d}X\t{u}\n" for u in range(N_USERS)))
  with open(os.path.join(data, "i_id_mapping.csv"), "w") as f:
    f.write("asin\titemID\n" + "".join(f"B{i:04d}\t{i}\n" for i in range(N_ITEMS)))
  config = tiny_config(data, model="freedom")
  config.max_epochs = 2  # valid recall@20 peaks at epoch 1: best != last parameters
  workdir = str(root / "run")
  result = train.train_and_evaluate(config, workdir)
  pairs = {split: np.stack([users, items], 1)[labels == label]
           for label, split in enumerate(("train", "valid", "test"))}
  return {"workdir": workdir, "data": data, "result": result, "config": config,
          "pairs": pairs, "root": root}


@pytest.fixture(scope="module")
def run(trained):
  return workdir_lib.load_run(trained["workdir"])


def read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def items_of(pairs):
  out = {}
  for u, i in pairs.tolist():
    out.setdefault(u, set()).add(i)
  return out


def one_error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_exclude_all_drops_every_known_interaction(trained, tmp_path, capsys):
  out = str(tmp_path / "recs.csv")
  assert recommend.main(["recommend", f"--workdir={trained['workdir']}", "--k=20",
                         f"--out={out}"]) == 0
  assert "wrote" in capsys.readouterr().out
  header, rows = read_csv(out)
  assert header == ["user", "rank", "item", "user_original", "item_original"]
  known = items_of(np.concatenate(list(trained["pairs"].values())))
  by_user = {}
  for row in rows:
    by_user.setdefault(int(row["user"]), []).append(row)
  assert sorted(by_user) == list(range(N_USERS))  # every user (30 items - 8 known >= 20)
  for user, user_rows in by_user.items():
    assert [int(r["rank"]) for r in user_rows] == list(range(1, 21))
    recommended = [int(r["item"]) for r in user_rows]
    assert all(0 <= i < N_ITEMS for i in recommended) and len(set(recommended)) == 20
    assert not set(recommended) & known[user]
    assert all(r["user_original"] == f"A{user:03d}X" for r in user_rows)
    assert [r["item_original"] for r in user_rows] == [f"B{i:04d}" for i in recommended]


@pytest.mark.parametrize("k", [20, 10])
def test_exclude_train_reproduces_the_test_recall(trained, run, tmp_path, k):
  users, items, n_kept = recommend.recommend(run, k, exclude="train")
  out = str(tmp_path / "recs.csv")
  recommend.write_csv(out, users, items, n_kept)
  _, rows = read_csv(out)
  lists = {}
  for row in rows:
    lists.setdefault(int(row["user"]), []).append(int(row["item"]))
  train_items, test_items = items_of(trained["pairs"]["train"]), items_of(trained["pairs"]["test"])
  assert all(not set(lists[u]) & train_items[u] for u in lists)
  # evaluation.py: mean over users with a test item of |top-k & test| / |test|.
  recalls = [len(set(lists[u]) & test) / len(test) for u, test in test_items.items()]
  assert trained["result"]["best_epoch"] < trained["result"]["epochs"]  # best != last params
  assert np.mean(recalls) == pytest.approx(trained["result"]["test"][f"recall@{k}"], abs=1e-6)


def test_users_subset_and_one_line_errors(trained, tmp_path, capsys):
  users_file = tmp_path / "users.txt"
  users_file.write_text("7\n\n3\n7\n")
  out = str(tmp_path / "subset.csv")
  argv = ["recommend", f"--workdir={trained['workdir']}", "--k=5", f"--out={out}"]
  moved = str(tmp_path / "moved_data")  # --data: the run's data folder, moved
  shutil.copytree(trained["data"], moved)
  assert recommend.main(argv + [f"--users={users_file}", "--exclude=train",
                                f"--data={moved}"]) == 0
  _, rows = read_csv(out)
  assert [int(r["user"]) for r in rows] == [7] * 5 + [3] * 5
  assert [int(r["rank"]) for r in rows] == list(range(1, 6)) * 2
  capsys.readouterr()

  users_file.write_text("3\n40\n")
  assert recommend.main(argv + [f"--users={users_file}"]) == 1
  assert "line 2: unknown user id '40'" in one_error_line(capsys)
  users_file.write_text("3\nabc\n")
  assert recommend.main(argv + [f"--users={users_file}"]) == 1
  assert "unknown user id 'abc'" in one_error_line(capsys)

  missing = str(tmp_path / "no_such_run")
  for tool, extra in ((recommend, []), (export, [f"--out={tmp_path / 'x'}"])):
    assert tool.main([tool.__name__, f"--workdir={missing}"] + extra) == 1
    assert "no such run folder" in one_error_line(capsys)

  # A run folder without a best checkpoint, and one whose data folder moved.
  broken = tmp_path / "broken"
  broken.mkdir()
  shutil.copy(os.path.join(trained["workdir"], "metrics.json"), broken)
  assert recommend.main(["recommend", f"--workdir={broken}"]) == 1
  assert "no best checkpoint" in one_error_line(capsys)
  (broken / "checkpoints" / "best" / "1").mkdir(parents=True)
  metrics = json.loads((broken / "metrics.json").read_text())
  metrics["data"]["path"] = str(tmp_path / "moved_away")
  (broken / "metrics.json").write_text(json.dumps(metrics))
  assert export.main(["export", f"--workdir={broken}", f"--out={tmp_path / 'x'}"]) == 1
  assert "does not exist; if it moved, pass --data" in one_error_line(capsys)
  other = str(tmp_path / "other_data")  # --data pointing at other data than the run's
  mmrec_writer.write_mmrec(other, "tiny", *make_interactions(N_USERS + 1, N_ITEMS))
  assert export.main(["export", f"--workdir={broken}", f"--out={tmp_path / 'x'}",
                      f"--data={other}"]) == 1
  assert "not the data" in one_error_line(capsys)


def test_export_writes_the_best_representations(trained, tmp_path, capsys):
  out = tmp_path / "emb"
  assert export.main(["export", f"--workdir={trained['workdir']}", f"--out={out}"]) == 0
  capsys.readouterr()
  # Reference: the run rebuilt from the test's own config, the best checkpoint restored.
  config = trained["config"]
  data = dataset_lib.load_dataset(trained["data"])
  experiment = train.create_train_state(config, data)
  checkpoints = checkpoint_lib.Checkpoints(trained["workdir"], experiment.layout.state)
  params, _ = checkpoints.restore_best()
  checkpoints.close()
  reps = experiment.backbone.represent(params["backbone"], experiment.state.model_state,
                                       experiment.static, experiment.config)
  size = config.embedding_size
  expected = {"users.npy": (reps.users, (N_USERS, size)),
              "items.npy": (reps.items, (N_ITEMS, size))}
  for name in ("image", "text"):
    table = reps.modality_items[name]
    table = table.materialize() if isinstance(table, ProjectedRows) else table
    expected[f"items_{name}.npy"] = (table, (N_ITEMS, size))
  assert sorted(os.listdir(out)) == sorted(list(expected) + ["README.md"])
  readme = (out / "README.md").read_text()
  for name, (array, shape) in expected.items():
    saved = np.load(out / name)
    assert saved.shape == shape and saved.dtype == np.float32
    np.testing.assert_allclose(saved, np.asarray(jax.device_get(array)), rtol=1e-5, atol=1e-6)
    assert f"`{name}` | {shape}" in readme
  assert "u_id_mapping.csv" in readme


def test_learning_curves_png_and_csv(trained, tmp_path, caplog):
  workdir = trained["workdir"]
  with open(os.path.join(workdir, "learning_curves.png"), "rb") as f:
    png = f.read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  header, rows = read_csv(os.path.join(workdir, "learning_curves.csv"))
  assert header == ["epoch", "backbone_loss", "alignment_loss", "loss", "valid_recall@20"]
  history = trained["result"]["history"]
  assert len(rows) == len(history) == trained["result"]["epochs"]
  for row, record in zip(rows, history):
    assert {k: float(v) for k, v in row.items()} == {k: float(record[k]) for k in header}
  # A plotting failure is one note, never an exception.
  caplog.clear()
  workdir_lib.write_curves(str(tmp_path / "no" / "such" / "dir"), trained["result"])
  notes = [record.getMessage() for record in caplog.records]
  assert len(notes) == 1 and notes[0].startswith("note: learning curves not written")


def test_fig1_false_positives_of_a_finished_run(trained, run, tmp_path, capsys):
  from fettle_jax import figures  # pylint: disable=g-import-not-at-top
  from fettle_jax.tools import figures as figures_tool  # pylint: disable=g-import-not-at-top
  out = tmp_path / "figs"
  assert figures_tool.main(["figures.py", "fig1", f"--runs=A={trained['workdir']}",
                            f"--out={out}"]) == 0
  with open(out / "fig1.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["reference"] for r in rows] == ["content features", "own modality embeddings"]
  # The content-feature reference: the same count as the library on the data's features
  # and the best checkpoint's items (FREEDOM exposes image and text item embeddings).
  arrays = export.embeddings(run)
  want = figures.false_positive_share(list(run.data.features.values()), arrays["items.npy"])
  assert int(rows[0]["false_positives"]) == want["false_positives"]
  assert int(rows[0]["dissimilar_pairs"]) == want["dissimilar_pairs"] > 0
  want = figures.false_positive_share([arrays["items_image.npy"], arrays["items_text.npy"]],
                                      arrays["items.npy"])
  assert int(rows[1]["false_positives"]) == want["false_positives"]
  assert (out / "fig1.png").stat().st_size > 10_000
  assert "dissimilar pairs ranked similar" in capsys.readouterr().out


@pytest.mark.parametrize("figure", ["fig5", "fig6"])
def test_tsne_figures_of_a_finished_run(trained, run, tmp_path, figure):
  from fettle_jax.tools import figures as figures_tool  # pylint: disable=g-import-not-at-top
  out = tmp_path / figure
  assert figures_tool.main(["figures.py", figure, f"--runs=A={trained['workdir']},"
                            f"B={trained['workdir']}", "--items=20", "--users=3",
                            f"--out={out}"]) == 0
  assert (out / f"{figure}.png").stat().st_size > 10_000
  arrays = export.embeddings(run)
  if figure == "fig5":
    with open(out / "fig5.csv") as f:
      rows = list(csv.DictReader(f))
    assert [(r["run"], r["modality"]) for r in rows] == [
        ("A", "image"), ("A", "text"), ("B", "image"), ("B", "text")]
    items = arrays["items.npy"] / np.linalg.norm(arrays["items.npy"], axis=1, keepdims=True)
    image = arrays["items_image.npy"]
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    want = np.mean(np.sum(items * image, 1))
    assert float(rows[0]["mean_cosine_to_id"]) == pytest.approx(want, abs=1e-5)
    with open(out / "fig5_points.csv") as f:
      points = list(csv.DictReader(f))
    assert len(points) == 2 * 3 * 20  # runs x modalities (ID, image, text) x items
  else:
    with open(out / "fig6.csv") as f:
      points = list(csv.DictReader(f))
    train_pairs = trained["pairs"]["train"]
    degree = np.bincount(train_pairs[:, 0], minlength=N_USERS)
    # The 3 users nearest the median number of train items, lower ids first on ties.
    median = np.median(degree[degree > 0])
    users = sorted(range(N_USERS), key=lambda u: (abs(degree[u] - median), u))[:3]
    # Per run: each user, and each of its train items in the 3 modalities.
    assert len(points) == 2 * sum(1 + 3 * degree[u] for u in users)
    assert {p["user"] for p in points} == {f"user {u}" for u in users}
