"""Seconds per training epoch and peak host memory of each backbone, alone and aligned,
side by side in one run.

  python scripts/epoch_times.py --data=/tmp/baby_twin --backbones=freedom,grcn,lattice

Each (backbone, alignment) pair trains in its own child process (so each peak RSS is its
own): the data set loads, the real compiled epoch (`train.make_train_epoch`: the epoch
hook, every batch, Adam) runs --epochs times after one warm-up epoch that compiles it, and
the child reports the median epoch time and its peak resident memory. Children run one
after another; --rounds > 1 repeats the whole list so machine noise hits every pair alike.
"""

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_DATA = flags.DEFINE_string("data", "/tmp/baby_twin", "MMRec/LATTICE-format data folder.")
_CONFIGS = flags.DEFINE_enum("configs", "baby", ["baby", "ml100k"],
                              "Config family: configs/<backbone>_<configs>.py.")
_BACKBONES = flags.DEFINE_list("backbones", ["lightgcn", "freedom"], "Backbones.")
_ALIGNMENTS = flags.DEFINE_list("alignments", ["none", "fettle"], "Variants of each backbone.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Timed epochs per child (after a warm-up epoch).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Passes over every pair; medians are reported.")
_JSON = flags.DEFINE_string("json", "", "Also write every measurement to this JSON file.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'backbone,alignment' to time.")


def time_one(backbone: str, alignment: str) -> dict:
  """In this process: median seconds per compiled epoch and the process's peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  from fettle_jax import train  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{backbone}_{_CONFIGS.value}").get_config()
  config.data.path, config.data.prepare, config.alignment = _DATA.value, "", alignment
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  del data
  epoch = train.make_train_epoch(run.backbone, run.alignment, run.config, run.optimizer,
                                 run.info, run.layout)
  state, rng, times = run.state, run.train_rng, []
  for index in range(_EPOCHS.value + 1):
    start = time.perf_counter()
    state, losses = epoch(state, jax.random.fold_in(rng, index), run.static)
    jax.block_until_ready(losses)
    if index:  # epoch 0 compiles
      times.append(time.perf_counter() - start)
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return {"backbone": backbone, "alignment": alignment, "epoch_s": statistics.median(times),
          "epoch_times_s": times, "peak_rss_gib": peak_kib / 2**20,
          "losses": [float(x) for x in jax.device_get(losses)]}


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(time_one(*_CHILD.value.split(","))))
    return
  pairs = [(b, a) for b in _BACKBONES.value for a in _ALIGNMENTS.value]
  results = {pair: [] for pair in pairs}
  for round_index in range(_ROUNDS.value):
    for backbone, alignment in pairs:
      child = subprocess.run(
          [sys.executable, os.path.abspath(__file__), f"--child={backbone},{alignment}",
           f"--data={_DATA.value}", f"--configs={_CONFIGS.value}", f"--epochs={_EPOCHS.value}"],
          capture_output=True, text=True, check=False)
      if child.returncode:
        tail = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{backbone}+{alignment}: failed (exit {child.returncode}): {tail}", flush=True)
        continue
      result = json.loads(child.stdout.strip().splitlines()[-1])
      results[(backbone, alignment)].append(result)
      print(f"round {round_index + 1}: {backbone:>9} + {alignment:<6} "
            f"{result['epoch_s']:7.2f} s/epoch, peak RSS {result['peak_rss_gib']:.2f} GiB",
            flush=True)
  base = statistics.median(r["epoch_s"] for r in results[pairs[0]]) if results[pairs[0]] else None
  print(f"\n| backbone | alignment | s/epoch (median) | vs {pairs[0][0]}+{pairs[0][1]} "
        "| peak RSS GiB |\n|---|---|---|---|---|")
  for (backbone, alignment), runs in results.items():
    if not runs:
      print(f"| {backbone} | {alignment} | failed | | |")
      continue
    seconds = statistics.median(r["epoch_s"] for r in runs)
    ratio = f"{seconds / base:.2f}x" if base else ""
    print(f"| {backbone} | {alignment} | {seconds:.2f} | {ratio} | "
          f"{max(r['peak_rss_gib'] for r in runs):.2f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump([r for runs in results.values() for r in runs], f, indent=1)


if __name__ == "__main__":
  app.run(main)
