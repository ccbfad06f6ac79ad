"""LightGCN on Baby: one training epoch and one evaluation pass (all users x all items)
timed against their FLOP and byte floors, on this machine's measured rates.

  python scripts/lightgcn_floor.py --data=../shared/data/amazon-baby-5core \
      [--rounds=3] [--json=FILE] [--baseline=/tmp/floor_before]

The rates are scripts/benchmark_steps.py's (float32 matmul; one read pass over 256 MiB).
Both programs are compiled once, then timed in alternating rounds (median). The floor of
a stage is max(FLOPs / matmul rate, bytes / stream rate) for an analytic count of this
code's work (`analytic_costs`): XLA's cost analysis counts a loop body once (the epoch's
scan, evaluation's lax.map) and the CPU CSR product, a custom call, as nothing, so its
numbers are printed next to the table but not used. The byte count charges every gathered
embedding row at the stream rate, as a streaming kernel moves it; rows that stay in cache
cost less, so the byte floor is that of such a kernel, not of any algorithm.

`--baseline=DIR` (e.g. `git worktree add /tmp/floor_before HEAD`) adds rows `@baseline`:
that checkout's graphs.py, sampling.py, evaluation.py and backbones/lightgcn.py, loaded
as modules of their own (everything else is this tree's), compiled and timed in the same
process and the same alternating rounds.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import time

from absl import app
from absl import flags
import chex
import jax
import numpy as np

import benchmark_steps  # pylint: disable=g-import-not-at-top
from fettle_jax import train

for _name in ("data", "rounds", "json", "baseline"):  # benchmark_steps' own, same names
  delattr(flags.FLAGS, _name)
_DATA = flags.DEFINE_string("data", "../shared/data/amazon-baby-5core", "Baby (LATTICE split).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds; medians are reported.")
_JSON = flags.DEFINE_string("json", "", "Also write every number to this JSON file.")
_BASELINE = flags.DEFINE_string("baseline", "", "Another checkout: adds '@baseline' rows.")

LIBRARY = {"graphs": "graphs.py", "sampling": "sampling.py", "evaluation": "evaluation.py",
           "lightgcn": os.path.join("backbones", "lightgcn.py")}


def load_baseline(checkout: str) -> dict:
  """That checkout's library modules, LightGCN wired to its graphs module."""
  modules = {}
  for name, relative in LIBRARY.items():
    path = os.path.join(checkout, "fettle_jax", relative)
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
    modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[name])
  modules["lightgcn"].graphs = modules["graphs"]
  return modules


@contextlib.contextmanager
def library(modules):
  """train.py's sampling and evaluation are `modules`' while programs are traced."""
  saved = train.sampling, train.evaluation
  if modules:
    train.sampling, train.evaluation = modules["sampling"], modules["evaluation"]
  try:
    yield
  finally:
    train.sampling, train.evaluation = saved


def xla_costs(compiled) -> dict:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return {"flops": benchmark_steps.flops_of(compiled),
          "bytes": float(analysis.get("bytes accessed", float("nan")))}


def build(config, data, modules=None) -> dict:
  """Compiled epoch and evaluation programs (traced with `modules` where given)."""
  run = train.create_train_state(config, data)
  backbone = modules["lightgcn"] if modules else run.backbone
  eval_data = train.build_eval_data(data, run.config, run.layout)
  if modules and hasattr(modules["evaluation"], "interaction_bitmask"):
    # A checkout from before the sparse seen-item masks: its own dense bit-matrix inputs.
    old = modules["evaluation"]
    eval_data = jax.device_put(old.build_eval_data(
        [data.valid, data.test], old.interaction_bitmask(data.train, data.n_users, data.n_items),
        data.n_users, data.n_items, run.config.eval_batch_size))
  chex.clear_trace_counter()  # train.py allows one trace per program; this is another run
  with library(modules):
    epoch = train.make_train_epoch(backbone, run.alignment, run.config, run.optimizer,
                                   run.info, run.layout)
    evaluate = train.make_evaluate(backbone, run.config, run.layout)
    epoch = epoch.lower(run.state, run.train_rng, run.static).compile()
    evaluate = evaluate.lower(run.state.params, run.state.model_state, run.static,
                              eval_data).compile()
  return {"run": run, "state": run.state, "eval_data": eval_data, "epoch": epoch,
          "evaluate": evaluate, "xla": {"epoch": xla_costs(epoch), "eval": xla_costs(evaluate)}}


def time_epoch(entry) -> float:
  run = entry["run"]
  start = time.perf_counter()
  entry["state"], losses = entry["epoch"](entry["state"], run.train_rng, run.static)
  jax.block_until_ready(losses)
  return time.perf_counter() - start


def time_eval(entry) -> float:
  state = entry["state"]
  start = time.perf_counter()
  jax.block_until_ready(entry["evaluate"](state.params, state.model_state, entry["run"].static,
                                          entry["eval_data"]))
  return time.perf_counter() - start


def analytic_costs(n_users, n_items, n_train, batch, dim, n_layers, eval_rows) -> dict:
  """FLOPs and bytes (float32) of one epoch and one evaluation pass of this code's work.

  A product with the normalized graph (E = 2 n_train directed edges, N nodes): 2 E d FLOPs;
  reads each edge's column and weight and gathers its sender's row, writes N rows. A step
  runs 2L of them (L forward; L backward, the same product on the cotangent), the layer
  mean forward and backward (2 (L + 2) passes over [N, d]), BPR on 3 x batch rows, and
  Adam (read p, g, m, v; write p, m, v: 12 FLOPs, 28 bytes per parameter). Evaluation:
  L forward products, 2 x rows x items x d FLOPs of scores, written once and read once by
  the top-k (a compare each); the negative-sampling permutation and the top-k's own
  selection work are not counted.
  """
  nodes, edges, n_steps = n_users + n_items, 2 * n_train, -(-n_train // batch)
  table = nodes * dim
  product = {"flops": 2 * edges * dim, "bytes": 4 * edges * dim + 8 * edges + 4 * nodes
             + 4 * table}
  # Forward reads the L + 1 layers and writes their mean; backward the same for cotangents.
  layer_mean = {"flops": 2 * (n_layers + 1) * table, "bytes": 2 * (n_layers + 2) * 4 * table}
  bpr = {"flops": 2 * 2 * 3 * batch * dim, "bytes": 2 * 2 * 4 * 3 * batch * dim}
  adam = {"flops": 12 * table, "bytes": 28 * table}
  step = {k: 2 * n_layers * product[k] + layer_mean[k] + bpr[k] + adam[k] for k in product}
  scores = eval_rows * n_items
  evaluation = {"flops": n_layers * product["flops"] + 2 * scores * dim + scores,
                "bytes": n_layers * product["bytes"] + 8 * scores + 4 * table + 8 * n_train}
  return {"epoch": {k: n_steps * v for k, v in step.items()}, "eval": evaluation,
          "n_steps": n_steps}


def floor_row(seconds, costs, matmul_flops_per_s, stream_bytes_per_s) -> dict:
  flop_floor = costs["flops"] / matmul_flops_per_s
  byte_floor = costs["bytes"] / stream_bytes_per_s
  floor = max(flop_floor, byte_floor)
  return {"seconds": seconds, **costs, "flop_floor_s": flop_floor, "byte_floor_s": byte_floor,
          "floor_s": floor, "over_floor": seconds / floor}


def main(argv):
  del argv
  config = importlib.import_module("configs.lightgcn_baby").get_config()
  config.data.path = _DATA.value
  data = train.load_data(config)
  print(data.summary())
  matmul = max(benchmark_steps.matmul_rates().values())
  stream = benchmark_steps.stream_rate()
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; matmul "
        f"{matmul:.1f} GFLOP/s, stream {stream:.1f} GB/s", flush=True)
  entries = {"": build(config, data)}
  if _BASELINE.value:
    entries["@baseline"] = build(config, data, load_baseline(_BASELINE.value))
  run = entries[""]["run"]
  costs = analytic_costs(data.n_users, data.n_items, len(data.train), run.config.batch_size,
                         run.config.embedding_size, run.config.lightgcn.n_layers,
                         int(np.prod(entries[""]["eval_data"].users.shape)))
  times = {(stage, name): [] for stage in ("epoch", "eval") for name in entries}
  for name, entry in entries.items():  # warm-up: first-touch of every buffer
    time_epoch(entry), time_eval(entry)
  for i in range(_ROUNDS.value):  # ABBA order: whichever runs first in a round is slower
    for name, entry in list(entries.items())[::1 if i % 2 == 0 else -1]:
      times["epoch", name].append(time_epoch(entry))
      times["eval", name].append(time_eval(entry))
  rows = {f"{stage}{name}": floor_row(statistics.median(t), costs[stage], matmul * 1e9,
                                      stream * 1e9) for (stage, name), t in times.items()}
  print(f"\n{costs['n_steps']} steps of batch {run.config.batch_size} per epoch\n")
  print("| stage | measured s | FLOPs | bytes | FLOP floor s | byte floor s | floor = max "
        "| measured / floor |\n|---|---|---|---|---|---|---|---|")
  for stage, r in rows.items():
    print(f"| {stage} | {r['seconds']:.3f} | {r['flops'] / 1e9:.2f} G | {r['bytes'] / 1e9:.2f} GB "
          f"| {r['flop_floor_s']:.3f} | {r['byte_floor_s']:.3f} | {r['floor_s']:.3f} "
          f"| {r['over_floor']:.2f}x |")
  if "@baseline" in entries:
    for stage in ("epoch", "eval"):
      print(f"{stage}: this tree / baseline = "
            f"{rows[stage]['seconds'] / rows[stage + '@baseline']['seconds']:.3f}")
  for name, entry in entries.items():
    for stage, xla in entry["xla"].items():
      print(f"XLA cost analysis {stage}{name} (loop body once, CSR product as 0): "
            f"{xla['flops'] / 1e9:.3f} GFLOP, {xla['bytes'] / 1e9:.3f} GB")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"data": data.summary(), "matmul_gflops_per_s": matmul,
                 "stream_gb_per_s": stream, "rows": rows, "n_steps": costs["n_steps"],
                 "xla": {n or "this": e["xla"] for n, e in entries.items()},
                 "times_s": {f"{s}{n}": t for (s, n), t in times.items()}}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
