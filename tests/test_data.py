"""Loaders of both formats, the converter, and one clear error for each kind of bad input."""

import json
import logging as std_logging
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import dataset as dataset_lib
from data_pipeline import lattice
from data_pipeline import mmrec_writer
from data_pipeline.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_inter(path, text, name="d"):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, f"{name}.inter"), "w") as f:
    f.write(text)
  return str(path)


GOOD = "userID\titemID\trating\tx_label\n0\t0\t5\t0\n0\t1\t4\t1\n0\t2\t3\t2\n1\t1\t5\t0\n1\t2\t1\t1\n1\t0\t2\t2\n"


def test_mmrec_folder_loads_with_extra_columns(tmp_path):
  data = dataset_lib.load_dataset(write_inter(tmp_path, GOOD))
  assert (data.n_users, data.n_items) == (2, 3)
  assert data.train.tolist() == [[0, 0], [1, 1]]
  assert data.valid.tolist() == [[0, 1], [1, 2]]
  assert data.test.tolist() == [[0, 2], [1, 0]]


def test_lattice_folder_and_converter_round_trip(tmp_path):
  src = tmp_path / "lattice"
  src.mkdir()
  for file, content in {"train.json": {"0": [0, 1], "1": [2]}, "val.json": {"0": [2], "1": [0]},
                        "test.json": {"0": [3], "1": [1]}}.items():
    (src / file).write_text(json.dumps(content))
  np.save(src / "text_feat.npy", np.ones((4, 3), np.float32))
  direct = dataset_lib.load_dataset(str(src))
  converted = dataset_lib.load_dataset(lattice.convert_to_mmrec(str(src), str(tmp_path / "m"), "x"))
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(direct, split), getattr(converted, split))
  assert direct.features.keys() == converted.features.keys() == {"text"}


def test_real_baby_split_counts():
  path = os.path.join(ROOT, "..", "shared", "data", "amazon-baby-5core")
  if not os.path.isdir(path):
    pytest.skip("shared Baby data not present")
  data = dataset_lib.load_dataset(path)
  assert (data.n_users, data.n_items) == (19445, 7050)
  assert (len(data.train), len(data.valid), len(data.test)) == (119674, 20559, 20559)


BAD_INTER = {
    "missing column": ("userID\titemID\n0\t1\n", "missing column 'x_label'"),
    "non-integer id": ("userID\titemID\tx_label\n0\tabc\t0\n", "non-integer value 'abc'"),
    "fractional id": ("userID\titemID\tx_label\n0\t1.5\t0\n", "non-integer value"),
    "negative id": ("userID\titemID\tx_label\n-3\t1\t0\n0\t1\t1\n0\t0\t2\n", "negative id"),
    "bad label": ("userID\titemID\tx_label\n0\t1\t7\n", "x_label must be"),
    "empty split": ("userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n", "test split has no interactions"),
    "sparse item ids": ("userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n0\t2000000000\t2\n",
                        "item ids are not 0..n-1 .3 distinct ids, largest 2000000000.; renumber"),
    "sparse user ids": ("userID\titemID\tx_label\n0\t0\t0\n7\t1\t1\n0\t2\t2\n",
                        "user ids are not 0..n-1"),
    "no rows": ("userID\titemID\tx_label\n", "no interactions"),
    "short line": ("userID\titemID\tx_label\n0\t1\n", "fewer fields"),
}


@pytest.mark.parametrize("case", sorted(BAD_INTER))
def test_bad_interaction_files(tmp_path, case):
  text, message = BAD_INTER[case]
  with pytest.raises(DataError, match=message) as error:
    dataset_lib.load_dataset(write_inter(tmp_path, text))
  assert "\n" not in str(error.value)
  assert "d.inter" in str(error.value) or str(tmp_path) in str(error.value)


@pytest.mark.parametrize("case,matrix,message", [
    ("rows", np.ones((2, 4), np.float32), "item id 2 is out of range: the feature files have 2 rows"),
    ("nan", np.array([[1, np.nan], [0, 1], [1, 1]], np.float32), "NaN/inf values in 1 rows"),
    ("inf", np.array([[1, 1], [0, np.inf], [1, 1]], np.float32), "first: item 1"),
    ("1-d", np.ones(3, np.float32), "expected a 2-D"),
])
def test_bad_feature_files_fail_whatever_the_model(tmp_path, case, matrix, message):
  del case
  path = write_inter(tmp_path, GOOD)
  np.save(os.path.join(path, "image_feat.npy"), matrix)
  with pytest.raises(DataError, match=message):
    dataset_lib.load_dataset(path)


def test_feature_files_disagreeing_on_rows(tmp_path):
  path = write_inter(tmp_path, GOOD)
  np.save(os.path.join(path, "image_feat.npy"), np.ones((5, 4), np.float32))
  np.save(os.path.join(path, "text_feat.npy"), np.ones((4, 2), np.float32))
  with pytest.raises(DataError, match="text_feat.npy: has 4 rows but the catalogue has 5 items"):
    dataset_lib.load_dataset(path)
  os.remove(os.path.join(path, "text_feat.npy"))
  data = dataset_lib.load_dataset(path)  # more feature rows than ids: items never interacted
  assert data.n_items == 5


def test_missing_folder_and_missing_modality(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    dataset_lib.load_dataset(str(tmp_path / "nope"))
  with pytest.raises(DataError, match="no `<name>.inter`"):
    dataset_lib.load_dataset(str(tmp_path))
  with pytest.raises(DataError, match="image_feat.npy is missing"):
    dataset_lib.load_dataset(write_inter(tmp_path / "x", GOOD), modalities=["image"])


def test_bad_lattice_files(tmp_path):
  (tmp_path / "train.json").write_text('{"0": [1, 2]}')
  (tmp_path / "val.json").write_text('{"0": [3]}')
  with pytest.raises(DataError, match="test.json: split file not found"):
    dataset_lib.load_dataset(str(tmp_path))
  (tmp_path / "test.json").write_text('{"0": ["x"]}')
  with pytest.raises(DataError, match="non-integer item id 'x'"):
    dataset_lib.load_dataset(str(tmp_path))
  (tmp_path / "test.json").write_text('{"0": [4')
  with pytest.raises(DataError, match="not valid JSON"):
    dataset_lib.load_dataset(str(tmp_path))


def test_duplicates_dropped_with_a_count(tmp_path, caplog):
  text = GOOD + "0\t0\t5\t0\n0\t0\t5\t0\n1\t1\t1\t2\n"  # 2 train dups; a test copy of a train pair
  with caplog.at_level(std_logging.WARNING):
    data = dataset_lib.load_dataset(write_inter(tmp_path, text))
  assert len(data.train) == 2 and len(data.test) == 2
  assert "dropped 2 duplicate train interactions" in caplog.text
  assert "dropped 1 duplicate test interactions" in caplog.text


def test_valid_test_users_absent_from_train_are_dropped(tmp_path):
  text = GOOD + "2\t0\t5\t1\n2\t1\t5\t2\n"  # user 2 has no train interaction
  data = dataset_lib.load_dataset(write_inter(tmp_path, text))
  assert 2 not in data.valid[:, 0] and 2 not in data.test[:, 0]


def test_run_py_bad_input_is_one_line_without_traceback(tmp_path):
  path = write_inter(tmp_path / "data", "userID\titemID\tx_label\n0\tabc\t0\n")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), "--config=" + os.path.join(ROOT, "configs",
       "lightgcn_baby.py"), f"--config.data.path={path}", f"--workdir={workdir}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1 and "non-integer value 'abc'" in error_lines[0]
  assert not (workdir / "metrics.json").exists()


def test_writer_is_read_back(tmp_path):
  path = mmrec_writer.write_mmrec(str(tmp_path), "w", [0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 0, 2],
                                  {"kg": np.zeros((2, 3))})
  data = dataset_lib.load_dataset(path)
  assert data.train.tolist() == [[0, 0], [1, 1]]
  assert data.valid.tolist() == [[0, 1]] and data.test.tolist() == [[1, 0]]
  assert data.features["kg"].dtype == np.float32 and data.features["kg"].shape == (2, 3)


def test_convert_cli(tmp_path):
  src = tmp_path / "lattice"
  src.mkdir()
  for file, content in {"train.json": {"0": [0, 1]}, "val.json": {"0": [2]},
                        "test.json": {"0": [3]}}.items():
    (src / file).write_text(json.dumps(content))
  out = tmp_path / "mmrec"
  ok = subprocess.run([sys.executable, "-m", "data_pipeline.convert", f"--src={src}",
                       f"--out={out}", "--name=toy"], capture_output=True, text=True, cwd=ROOT,
                      timeout=120)
  assert ok.returncode == 0 and (out / "toy.inter").exists()
  bad = subprocess.run([sys.executable, "-m", "data_pipeline.convert", f"--src={tmp_path}/none",
                        f"--out={out}", "--name=toy"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "split file not found" in bad.stderr.strip().splitlines()[-1]


HEADER = "userID\titemID\trating\tx_label\n"
EDGE_FILES = {
    "good": GOOD,
    "crlf": GOOD.replace("\n", "\r\n"),
    "blank lines": HEADER + "\n0\t0\t5\t0\n\n1\t1\t5\t0\n0\t1\t4\t1\n1\t2\t1\t2\n\n",
    "whitespace line": HEADER + "0\t0\t5\t0\n  \n1\t1\t5\t0\n0\t1\t4\t1\n1\t2\t1\t2\n",
    "no final newline": HEADER + "0\t0\t5\t0\n1\t1\t5\t0\n0\t1\t4\t1\n1\t2\t1\t2",
    "columns reordered": "x_label\titemID\tuserID\n0\t0\t0\n0\t1\t1\n1\t1\t0\n2\t2\t1\n",
    "text column": "userID\titemID\tx_label\treview\n0\t0\t0\tgood\n1\t1\t0\tbad\n0\t1\t1\tok\n"
                   "1\t0\t2\tfine\n",
    "extra field in rows": HEADER + "0\t0\t5\t0\t9\n1\t1\t5\t0\t9\n0\t1\t4\t1\t9\n1\t0\t1\t2\t9\n",
    "float ids": HEADER + "0.0\t0\t5\t0\n1\t1e0\t5\t0\n0\t1\t4\t1.0\n1\t0\t1\t2\n",
    "spaces around": HEADER + " 0\t0 \t5\t0\n1\t1\t5\t0\n0\t1\t4\t1\n1\t0\t1\t2\n",
    "signs and underscores": HEADER + "+0\t0\t5\t0\n1\t1\t5\t0\n0\t1_0\t4\t1\n1\t0\t1\t2\n",
    "comment-like row": HEADER + "#0\t0\t5\t0\n1\t1\t5\t0\n",
    "quoted": HEADER + '"0"\t0\t5\t0\n1\t1\t5\t0\n',
    "non-integer": HEADER + "0\t0.5\t5\t0\n1\t1\t5\t0\n",
    "nan": HEADER + "0\tnan\t5\t0\n1\t1\t5\t0\n",
    "inf label": HEADER + "0\t0\t5\tinf\n1\t1\t5\t0\n",
    "negative": HEADER + "-1\t0\t5\t0\n1\t1\t5\t0\n",
    "huge": HEADER + "0\t3000000000\t5\t0\n1\t1\t5\t0\n",
    "past float precision": HEADER + "0\t9007199254740993\t5\t0\n1\t1\t5\t0\n",
    "past int64": HEADER + "0\t99999999999999999999\t5\t0\n1\t1\t5\t0\n",
    "float rating": HEADER + "0\t0\t4.5\t0\n1\t1\t5\t0\n0\t1\t4\t1\n1\t0\t1\t2\n",
    "bad label": HEADER + "0\t0\t5\t3\n1\t1\t5\t0\n",
    "short row": HEADER + "0\t0\t5\t0\n1\t1\t0\n",
    "short row with the used columns": "userID\titemID\tx_label\trating\n0\t0\t0\t5\n1\t1\t0\n",
    "header only": HEADER,
    "missing column": "userID\titemID\n0\t0\n",
    "bom": "\ufeff" + GOOD,
    "one row": HEADER + "0\t0\t5\t0\n",
}


@pytest.mark.parametrize("case", sorted(EDGE_FILES))
def test_columnar_reader_equals_line_reader(tmp_path, case):
  """np.loadtxt's path and the line-by-line reader give the same splits, or the same error."""
  from data_pipeline import mmrec  # pylint: disable=g-import-not-at-top
  folder = write_inter(tmp_path, EDGE_FILES[case])
  file = os.path.join(folder, "d.inter")

  def outcome(read):
    try:
      return read()
    except DataError as e:
      return str(e)

  fast = outcome(lambda: mmrec.read_inter(folder))
  lines = outcome(lambda: mmrec.read_inter_lines(file, "d"))
  assert type(fast) is type(lines), (fast, lines)
  if isinstance(lines, str):
    assert fast == lines
  else:
    assert fast[0] == lines[0]
    for split in lines[1]:
      np.testing.assert_array_equal(fast[1][split], lines[1][split])
      assert fast[1][split].dtype == lines[1][split].dtype


def test_columnar_reader_equals_line_reader_on_generated_sets(tmp_path):
  """Synthetic Baby-shaped data (the tests' fixture generator) and a random 20k-row file."""
  from data_pipeline import mmrec, synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = np.stack([rng.integers(0, 500, 20000), rng.integers(0, 900, 20000),
                   rng.integers(1, 6, 20000), rng.integers(0, 3, 20000)], 1)
  folder = tmp_path / "random"
  body = "".join("\t".join(map(str, r)) + "\n" for r in rows.tolist())
  write_inter(folder, HEADER + body)
  folders = [str(folder), synthetic.write(synthetic.generate("baby", seed=0, scale=0.05,
                                                             features=False),
                                          str(tmp_path / "syn"))]
  for f in folders:
    name, fast = mmrec.read_inter(f)
    _, slow = mmrec.read_inter_lines(mmrec.find_inter_file(f, None), name)
    for split in slow:
      np.testing.assert_array_equal(fast[split], slow[split])
