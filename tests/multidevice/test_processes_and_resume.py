"""Two processes x 4 CPU devices train like one process with 8; a run checkpointed on one
mesh resumes on another to the same metrics."""

import json
import os
import re
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from fettle_jax import train
from tests.conftest import ROOT, subprocess_env, tiny_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_same_metrics(a, b, atol=1e-5):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


def test_two_processes_match_one_process_with_eight_devices(tiny_mmrec, tmp_path):
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(
      "from tests.conftest import tiny_config\n"
      "def get_config():\n"
      f"  config = tiny_config({tiny_mmrec!r}, model='lightgcn', alignment='fettle')\n"
      "  config.max_epochs = 2\n"
      "  return config\n")
  port, workdir = free_port(), tmp_path / "two"
  env = subprocess_env(JAX_NUM_CPU_DEVICES="4")
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), f"--config={config_file}",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--distributed_timeout=60", "--compilation_cache=none"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  assert "epoch 2/2 |" in outputs[0] and "epoch 2/2" not in outputs[1]  # process 0 reports
  two = json.loads((workdir / "metrics.json").read_text())
  assert two["mesh"] == {"data": 8, "model": 1, "processes": 2}

  chex.clear_trace_counter()
  config = tiny_config(tiny_mmrec, model="lightgcn", alignment="fettle")
  config.max_epochs = 2
  one = train.train_and_evaluate(config, str(tmp_path / "one"))
  assert one["mesh"] == {"data": 8, "model": 1, "processes": 1}
  assert_same_metrics(two["test"], one["test"])
  assert_same_metrics(two["valid"], one["valid"])
  np.testing.assert_allclose([h["loss"] for h in two["history"]],
                             [h["loss"] for h in one["history"]], rtol=1e-6)


def test_killed_on_8x1_resumes_on_2x4_and_on_one_device(tiny_mmrec, tmp_path):
  def run(workdir, mesh, max_epochs):
    chex.clear_trace_counter()
    config = tiny_config(tiny_mmrec, model="freedom", alignment="fettle")
    config.mesh.data, config.mesh.model = mesh
    config.max_epochs, config.checkpoint_every_epochs = max_epochs, 2
    return train.train_and_evaluate(config, str(tmp_path / workdir))

  full = run("full", (8, 1), 4)
  for mesh in [(2, 4), (1, 1)]:
    name = f"resumed_{mesh[0]}x{mesh[1]}"
    run(name, (8, 1), 2)  # "killed" after the epoch-2 checkpoint
    resumed = run(name, mesh, 4)
    assert resumed["epochs"] == 4 and resumed["mesh"]["model"] == mesh[1]
    assert resumed["best_epoch"] == full["best_epoch"]
    assert_same_metrics(resumed["test"], full["test"])
    assert_same_metrics(resumed["valid"], full["valid"])


def test_a_dead_process_ends_the_other_with_one_error_line(tiny_mmrec, tmp_path):
  config_file = tmp_path / "endless_config.py"
  config_file.write_text(
      "from tests.conftest import tiny_config\n"
      "def get_config():\n"
      f"  config = tiny_config({tiny_mmrec!r}, model='bpr')\n"
      "  config.max_epochs = config.patience = 100000\n"
      "  config.checkpoint_every_epochs = 100000\n"
      "  return config\n")
  port = free_port()
  env = subprocess_env(JAX_NUM_CPU_DEVICES="4")
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), f"--config={config_file}",
       f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", "--distributed_timeout=5",
       "--compilation_cache=none"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for line in processes[0].stderr:  # training has started on both (absl logs to stderr)
    if re.search(r"\] epoch +3/", line):
      break
  processes[1].kill()  # its training child dies with it
  _, stderr = processes[0].communicate(timeout=120)
  assert processes[0].returncode == 1, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith(("W", "I", "["))]
  assert lines == ["error: process 0: another process of the multi-process run stopped (no "
                   "heartbeat within 5 s); rerun every process with the same --workdir to "
                   "resume from the last checkpoint"], stderr[-3000:]
