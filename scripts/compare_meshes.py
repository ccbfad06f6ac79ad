"""Trains one config on several device meshes and compares each with the 1x1 run: test
and valid metrics, per-epoch losses, and the final parameters (each run's last checkpoint
restored onto one device).

  JAX_NUM_CPU_DEVICES=8 python scripts/compare_meshes.py --config=configs/freedom_ml100k.py \
      --epochs=3 --meshes=8x1,4x2,2x4,1x8 [--workdir=/tmp/meshes]
"""

import json
import os

from absl import app
from absl import flags
import chex
import jax
import numpy as np
from ml_collections import config_flags

from fettle_jax import checkpoint
from fettle_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per run (early stopping off).")
_MESHES = flags.DEFINE_list("meshes", ["8x1", "4x2", "2x4", "1x8"], "data x model meshes.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/compare_meshes", "Parent of the run folders.")
_JSON = flags.DEFINE_string("json", "", "Also write the comparison to this JSON file.")


def run_on(config, mesh: str):
  chex.clear_trace_counter()
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.model = (int(n) for n in mesh.split("x"))
  config.max_epochs, config.patience = _EPOCHS.value, _EPOCHS.value + 1
  config.checkpoint_every_epochs = _EPOCHS.value
  workdir = os.path.join(_WORKDIR.value, mesh)
  if os.path.exists(os.path.join(workdir, "metrics.json")):
    os.remove(os.path.join(workdir, "metrics.json"))
  result = train.train_and_evaluate(config, workdir)
  return result, workdir


def final_params(workdir, placement):
  manager = checkpoint.Checkpoints(workdir, placement)
  try:
    state, _ = manager.restore_latest()
  finally:
    manager.close()
  return jax.device_get(state.params)


def max_abs(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv):
  del argv
  config = _CONFIG.value
  base, base_dir = run_on(config, "1x1")
  base_config = config.copy_and_resolve_references()
  base_config.mesh.data = base_config.mesh.model = 1
  one_device = train.create_train_state(base_config, train.load_data(base_config)).layout.state
  base_params = final_params(base_dir, one_device)
  rows = []
  for mesh in _MESHES.value:
    result, workdir = run_on(config, mesh)
    rows.append({
        "mesh": mesh,
        "test_recall@20": result["test"]["recall@20"],
        "max_metric_diff": max(abs(result[s][k] - base[s][k])
                               for s in ("valid", "test") for k in base[s]),
        "max_loss_diff": max(abs(a["loss"] - b["loss"])
                             for a, b in zip(result["history"], base["history"])),
        "max_param_diff": max_abs(final_params(workdir, one_device), base_params),
        "train_epoch_seconds": result["train_epoch_seconds"],
    })
  print(f"1x1: test recall@20 {base['test']['recall@20']:.6f}, "
        f"epoch {base['train_epoch_seconds']:.2f} s")
  for r in rows:
    print(f"{r['mesh']}: test recall@20 {r['test_recall@20']:.6f} | max |metric diff| "
          f"{r['max_metric_diff']:.2e} | max |loss diff| {r['max_loss_diff']:.2e} | "
          f"max |param diff| {r['max_param_diff']:.2e} | epoch {r['train_epoch_seconds']:.2f} s")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"base": {"test": base["test"]}, "meshes": rows}, f, indent=2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
