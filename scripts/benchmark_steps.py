"""Step time of each backbone alone vs. with FETTLE (or BM3), side by side in one process.

  python scripts/benchmark_steps.py --data=/tmp/baby_twin [--backbones=bpr,lightgcn,vbpr,freedom]

Make the data with `python -m data_pipeline.synthetic --like baby --out /tmp/baby_twin`
(paper-scale: 19,445 users, 7,050 items, 4096-d image + 384-d text); for ml100k pass
`--data=~/.cache/fettle_jax/ml100k --configs=ml100k` (prepared by one `python run.py`).
`--prototypes=2560,640` adds FETTLE rows at smaller codebooks. Each row times the same
compiled train step (forward, backward, Adam), scanned over --steps fresh batches as in a
training epoch, after one warm-up call; rounds alternate between variants so machine noise
hits them alike.
"""

import functools
import importlib
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
from fettle_jax import alignment as alignment_lib  # pylint: disable=g-import-not-at-top
from fettle_jax import sampling  # pylint: disable=g-import-not-at-top
from fettle_jax import train  # pylint: disable=g-import-not-at-top
from fettle_jax.backbones import get_backbone  # pylint: disable=g-import-not-at-top
from fettle_jax.types import Batch, DataInfo  # pylint: disable=g-import-not-at-top

_DATA = flags.DEFINE_string("data", "/tmp/baby_twin", "MMRec-format folder.")
_CONFIGS = flags.DEFINE_enum("configs", "baby", ["baby", "ml100k"],
                              "Config family: configs/<backbone>_<configs>.py.")
_BACKBONES = flags.DEFINE_list("backbones", ["bpr", "lightgcn", "vbpr", "freedom"], "Backbones.")
_ALIGNMENTS = flags.DEFINE_list("alignments", ["none", "fettle"], "Variants; the first is the base.")
_PROTOTYPES = flags.DEFINE_list(
    "prototypes", [], "Extra FETTLE rows at these P_ITV (P_UI = 2 P_ITV), e.g. 2560,640: "
    "how the cost scales with the codebooks.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds; the median step time is reported.")


def build_step(data, backbone_name, variant):
  """variant: an alignment name, or 'fettle@P' for FETTLE with P_ITV = P, P_UI = 2P."""
  config = importlib.import_module(f"configs.{backbone_name}_{_CONFIGS.value}").get_config()
  alignment_name, _, prototypes = variant.partition("@")
  config.alignment = alignment_name
  if prototypes:
    config.fettle.update(prototypes_item=int(prototypes), prototypes_user=2 * int(prototypes))
  backbone = get_backbone(backbone_name)
  alignment = alignment_lib.get_alignment(alignment_name)
  if hasattr(alignment, "fit_static_shapes"):
    config = alignment.fit_static_shapes(config, data.train, data.n_users, data.n_items)
  info = DataInfo(data.n_users, data.n_items, {k: v.shape[1] for k, v in data.features.items()})
  rng = jax.random.PRNGKey(0)
  params = {"backbone": backbone.init(rng, info, config),
            "alignment": alignment.init(rng, info, config)}
  optimizer = train.make_optimizer(config)
  state = train.TrainState(params, optimizer.init(params))
  train_data = train.TrainData(
      jnp.asarray(data.train), sampling.seen_items(data.train, data.n_users),
      backbone.build_graph(data.train, data.n_users, data.n_items, data.features, config),
      {k: jnp.asarray(v) for k, v in data.features.items()})
  step = train.make_train_step(backbone, alignment, config, optimizer)

  @functools.partial(jax.jit, donate_argnums=0)
  def steps(state, data, batches):
    # A lax.scan over the batches, as inside a training epoch (loop-invariant work such as
    # the CSR row pointers is hoisted out of the loop there too).
    def body(state, batch):
      state, losses = step(state, data, Batch(*batch), jax.random.PRNGKey(0))
      return state, losses
    return jax.lax.scan(body, state, tuple(batches))

  batches = sampling.epoch_batches(rng, train_data.train_pairs, train_data.seen, data.n_items,
                                   config.batch_size)
  return {"state": state, "steps": steps, "data": train_data, "batches": batches}


def run_steps(entry, n_steps, offset):
  n_batches = entry["batches"].users.shape[0]
  index = (offset + jnp.arange(n_steps)) % n_batches
  chunk = [b[index] for b in entry["batches"]]
  jax.block_until_ready(chunk)
  start = time.perf_counter()
  entry["state"], losses = entry["steps"](entry["state"], entry["data"], chunk)
  jax.block_until_ready(losses)
  return (time.perf_counter() - start) / n_steps


def main(argv):
  del argv
  data = dataset_lib.load_dataset(_DATA.value)
  print(data.summary())
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus")
  for backbone_name in _BACKBONES.value:
    variants = _ALIGNMENTS.value + [f"fettle@{p}" for p in _PROTOTYPES.value]
    entries = {v: build_step(data, backbone_name, v) for v in variants}
    times = {a: [] for a in entries}
    for name, entry in entries.items():
      run_steps(entry, _STEPS.value, 0)  # compile (same static shapes as the timed calls)
    for r in range(_ROUNDS.value):
      for name, entry in entries.items():
        times[name].append(run_steps(entry, _STEPS.value, 1 + r * _STEPS.value))
    base = statistics.median(times[_ALIGNMENTS.value[0]])
    row = " | ".join(f"{a} {statistics.median(t) * 1e3:7.1f} ms ({statistics.median(t) / base:4.2f}x)"
                     for a, t in times.items())
    print(f"{backbone_name:9s} | {row}", flush=True)


if __name__ == "__main__":
  app.run(main)
