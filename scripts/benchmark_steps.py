"""Step time of each backbone alone vs. with FETTLE (or BM3), side by side in one process,
and each FETTLE term's FLOPs, time and achieved rate next to this machine's matmul rate.

  python scripts/benchmark_steps.py --data=/tmp/baby_twin [--backbones=bpr,lightgcn,vbpr,freedom]

Make the data with `python -m data_pipeline.synthetic --like baby --out /tmp/baby_twin`
(paper-scale: 19,445 users, 7,050 items, 4096-d image + 384-d text); for ml100k pass
`--data=~/.cache/fettle_jax/ml100k --configs=ml100k` (prepared by one `python run.py`).
`--prototypes=2560,640` adds FETTLE rows at smaller codebooks. Each row times the same
compiled train step (forward, backward, Adam), scanned over --steps fresh batches as in a
training epoch, after one warm-up call; rounds alternate between variants so machine noise
hits them alike.

`--terms` (default on) adds, per backbone, one row per FETTLE term: forward + backward of
that term alone on one real batch (the backbone's representations at init), on the
branch (unique-item prefix) the batch takes, timed per call inside a scan of calls as an
epoch runs its steps; FLOPs from XLA's cost analysis of one call's compiled program. A
`floor` row: all terms' FLOPs at the measured matmul rate plus Sinkhorn's N reads of each
[n, P] kernel at the measured stream rate, and the +fettle / alone step ratio that would
leave (a bound for this code's work here). A `skeleton` row: the products, exps and
Sinkhorn rounds of CLA's code sets alone at the batch's shapes (`cla_skeleton`), timed in
the same alternating rounds as the steps, plus the other terms' FLOPs at the matmul rate:
the ratio if nothing else in FETTLE cost time.
`--implementations=fast,reference` adds a row `fettle@reference`: FETTLE's reference
implementation (fettle_jax/alignment/fettle/equations.py, `config.fettle.implementation`)
timed in the same alternating rounds as the default path (the row `fettle`).
`--json=FILE` writes every number.

`--baseline=DIR` adds a row `fettle@baseline`: FETTLE from another checkout
(fettle_jax/alignment/fettle/ or an older single-file fettle.py; e.g. `git worktree add
/tmp/before <commit>`), loaded as modules of its own (the rest of the code is this tree's)
and timed in the same process and the same alternating rounds, so a before/after
comparison shares the machine's state.

`--mesh=DxM` runs the steps on a data x model device mesh (e.g. 1x8 with
JAX_NUM_CPU_DEVICES=8) and prints, per variant, the bytes the first device holds of the
parameters, optimizer state and static inputs, measured from the arrays' shards, and the
compiled step's temporaries (XLA's memory analysis), next to scripts/scaling_table.py's
prediction from shapes.
"""

import contextlib
import importlib
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import baseline_fettle as baseline_lib  # scripts/baseline_fettle.py, beside this script
from data_pipeline import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
from fettle_jax.alignment.fettle import fast, shapes  # pylint: disable=g-import-not-at-top
from fettle_jax import alignment as alignment_lib  # pylint: disable=g-import-not-at-top
from fettle_jax import sampling  # pylint: disable=g-import-not-at-top
from fettle_jax import sharding  # pylint: disable=g-import-not-at-top
from fettle_jax import train  # pylint: disable=g-import-not-at-top
from fettle_jax.types import Batch  # pylint: disable=g-import-not-at-top

_DATA = flags.DEFINE_string("data", "/tmp/baby_twin", "MMRec-format folder.")
_CONFIGS = flags.DEFINE_enum("configs", "baby", ["baby", "ml100k"],
                              "Config family: configs/<backbone>_<configs>.py.")
_BACKBONES = flags.DEFINE_list("backbones", ["bpr", "lightgcn", "vbpr", "freedom"], "Backbones.")
_ALIGNMENTS = flags.DEFINE_list("alignments", ["none", "fettle"], "Variants; the first is the base.")
_PROTOTYPES = flags.DEFINE_list(
    "prototypes", [], "Extra FETTLE rows at these P_ITV (P_UI = 2 P_ITV), e.g. 2560,640: "
    "how the cost scales with the codebooks.")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", ["fast"], "FETTLE implementations to time: 'fast' (the row 'fettle', "
    "the default path) and/or 'reference' (a row 'fettle@reference': equations.py).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds; the median step time is reported.")
_TERMS = flags.DEFINE_bool("terms", True, "Per-term FLOPs / time / GFLOP/s table for FETTLE.")
_JSON = flags.DEFINE_string("json", "", "Also write every measurement to this JSON file.")
_BASELINE = flags.DEFINE_string(
    "baseline", "", "Another checkout: adds a 'fettle@baseline' row timing its "
    "fettle_jax/alignment/fettle.py side by side with this tree's.")
_MESH = flags.DEFINE_string("mesh", "", "data x model mesh, e.g. 1x8; '' = config default "
                            "(every device on 'data').")


def timed(fn, *args, repeats=5):
  """Median seconds per call of a compiled fn (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_rates():
  """This machine's float32 matmul rate (GFLOP/s): square, and FETTLE-shaped (K = 64)."""
  rates = {}
  for name, (m, k, n) in {"square 2048^3": (2048, 2048, 2048),
                          "skinny 2048x64x2048": (2048, 64, 2048)}.items():
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    rates[name] = 2 * m * k * n / timed(jax.jit(jnp.matmul), a, b, repeats=9) / 1e9
  return rates


def scanned_seconds(fn, inputs, index, n_calls: int = 4) -> float:
  """Seconds per call (median over repeats) of fn(inputs, index) -> (value, grads) inside
  one lax.scan of n_calls, as a training epoch runs its steps: the program's temporaries
  keep their addresses from call to call, so fresh memory is paid for once per scan, not
  per call (XLA:CPU maps its large temporaries anew for every execution; a single call
  pays a page fault per 4 KiB). The float inputs change per call so nothing is hoisted."""
  def shifted(x, i):
    return x * (1.0 + 1e-3 * i).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  def run(inputs, index):
    def body(total, i):
      value, grads = fn(jax.tree.map(lambda x: shifted(x, i), inputs), index)
      return total + value + sum(jnp.sum(g) for g in jax.tree.leaves(grads)), None
    return jax.lax.scan(body, jnp.zeros(()), jnp.arange(n_calls))[0]
  return timed(jax.jit(run), inputs, index) / n_calls


def stream_rate() -> float:
  """This machine's rate (GB/s) of one read pass over a large float32 array (a
  matrix-vector product over 256 MiB: the form of Sinkhorn's rounds)."""
  a = jnp.ones((4096, 16384), jnp.float32)
  v = jnp.ones((16384,), jnp.float32)
  return a.size * a.dtype.itemsize / timed(jax.jit(jnp.matmul), a, v, repeats=9) / 1e9


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def term_rows(data, backbone_name, entry):
  """Each enabled FETTLE term alone, forward + backward, on the branch its batch takes."""
  config, backbone = entry["config"], entry["backbone"]
  cfg, hints = config.fettle, shapes.shape_hints(config)
  # Logical (unpadded) copies as jit outputs: replicated on every device under a mesh.
  state, train_data = entry["state"], jax.jit(entry["layout"].static.logical)(entry["data"])
  param_shapes = entry["layout"].state.shapes.params
  params = jax.jit(lambda p: sharding.slice_to_shapes(p, param_shapes))(state.params)
  reps = jax.jit(lambda p, m, g: backbone.represent(p, m, g, config))(
      params["backbone"], state.model_state, train_data)
  batch = Batch(*(b[0] for b in entry["batches"]))
  inputs, index, layout = fast.prepare_terms(params["alignment"], reps, train_data.features,
                                             batch, cfg, hints)  # eager: the layout is static
  n_items = int(np.sum(np.asarray(index.valid)))
  n_users = (inputs.users.shape[0] if index.user_counts is None
             else int(np.sum(np.asarray(index.user_counts) > 0)))
  ladder = shapes.buckets(index.valid.shape[0], inputs.users.shape[0],
                          *shapes.static_bucket_hints(hints, index.user_counts is not None))
  bucket = next(b for b in ladder if n_items <= b.items and n_users <= b.users)
  # The [n, P] code sets a term forms (L_ITV^CLA: each modality over the unique items;
  # L_UI^CLA: the unique users and the unique items).
  code_sets = {"cla_itv": [(bucket.items, cfg.prototypes_item)] * len(layout.names),
               "cla_ui": [(bucket.users, cfg.prototypes_user),
                          (bucket.items, cfg.prototypes_user)]}
  rows = []
  for name in fast.enabled_terms(len(layout.names), cfg):
    term = jax.jit(jax.value_and_grad(
        lambda x, i, name=name: fast.alignment_term(name, *fast.bucket_prefix(x, i, bucket),
                                                    layout, cfg)))
    flops = flops_of(term.lower(inputs, index).compile())
    seconds = scanned_seconds(term, inputs, index)
    rows.append({"term": name, "flops": flops, "ms": seconds * 1e3,
                 "gflops_per_s": flops / seconds / 1e9,
                 "code_sets": code_sets.get(name, []),
                 "sinkhorn_gb": (cfg.sinkhorn_iterations * 4e-9
                                 * sum(n * p for n, p in code_sets.get(name, []))),
                 "items": n_items, "users": n_users, "bucket": list(bucket)})
  return rows


def variant_context(variant: str):
  """Where `variant`'s step is built and traced: --baseline's FETTLE for its row."""
  if variant == "fettle@baseline":
    return baseline_lib.baseline_fettle(_BASELINE.value)
  return contextlib.nullcontext()


def build_step(data, backbone_name, variant):
  """variant: an alignment name, 'fettle@P' for FETTLE with P_ITV = P, P_UI = 2P,
  'fettle@reference' for FETTLE's reference implementation (equations.py), or
  'fettle@baseline' for --baseline's FETTLE."""
  config = importlib.import_module(f"configs.{backbone_name}_{_CONFIGS.value}").get_config()
  alignment_name, _, prototypes = variant.partition("@")
  config.alignment = alignment_name
  if prototypes == "baseline":
    with baseline_lib.baseline_fettle(_BASELINE.value):
      return build_step(data, backbone_name, alignment_name)
  if prototypes == "reference":
    config.fettle.implementation = "reference"
  elif prototypes:
    config.fettle.update(prototypes_item=int(prototypes), prototypes_user=2 * int(prototypes))
  if _MESH.value:
    config.mesh.data, config.mesh.model = (int(n) for n in _MESH.value.split("x"))
  # A --baseline FETTLE may read fields today's config.fettle no longer has: its defaults.
  with config.unlocked():
    for key, value in alignment_lib.get_alignment("fettle").default_config().items():
      if key not in config.fettle:
        config.fettle[key] = value
  run = train.create_train_state(config, data)
  layout = run.layout
  step = train.make_train_step(run.backbone, run.alignment, run.config, run.optimizer, layout)

  def steps(state, static, batches):
    # A lax.scan over the batches, as inside a training epoch (loop-invariant work such as
    # the CSR row pointers is hoisted out of the loop there too).
    static = layout.static.logical(static)
    batches = layout.constrain_batches(batches)

    # Each step's rng differs, as in train.py's epoch: with one constant key XLA hoists
    # rng-only work (FREEDOM's pruned graph) out of the loop and the step looks cheaper.
    def body(state, xs):
      batch, index = xs
      state, losses = step(state, static, Batch(*batch),
                           jax.random.fold_in(jax.random.PRNGKey(0), index))
      return state, losses
    return jax.lax.scan(body, state, (tuple(batches), jnp.arange(batches[0].shape[0])))

  steps = train.under_mesh(jax.jit(steps, donate_argnums=0, out_shardings=(
      layout.state.shardings, layout.replicated())), layout.mesh)
  # Train pairs and the negative-sampling index are never padded (replicated).
  batches = sampling.epoch_batches(jax.random.PRNGKey(0), run.static.train_pairs,
                                   run.static.seen, data.n_items, run.config.batch_size)
  return {"state": run.state, "steps": steps, "data": run.static, "batches": batches,
          "config": run.config, "backbone": run.backbone, "layout": layout}


def memory_rows(data, entry, n_steps):
  """Measured bytes on the first device vs scaling_table's prediction, one row per column."""
  import scaling_table  # pylint: disable=g-import-not-at-top
  layout, state = entry["layout"], entry["state"]
  chunk = [b[:n_steps] for b in entry["batches"]]
  compiled = entry["steps"].lower(state, entry["data"], chunk).compile()
  analysis = compiled.memory_analysis()
  measured = {"params": sharding.per_device_bytes((state.params, state.model_state)),
              "opt_state": sharding.per_device_bytes(state.opt_state),
              "static": sharding.per_device_bytes(entry["data"]),
              "step temporaries (XLA)": getattr(analysis, "temp_size_in_bytes", None)}
  predicted = scaling_table.predict(
      entry["config"], data.n_users, data.n_items, len(data.train),
      {k: v.shape[1] for k, v in data.features.items()}, layout.data_size, layout.model_size)
  predicted["step temporaries (XLA)"] = predicted["step_activation"]
  return [{"column": k, "measured_bytes": v, "predicted_bytes": predicted[k]}
          for k, v in measured.items()]


def run_steps(entry, n_steps, offset):
  n_batches = entry["batches"].users.shape[0]
  index = (offset + jnp.arange(n_steps)) % n_batches
  chunk = [b[index] for b in entry["batches"]]
  jax.block_until_ready(chunk)
  start = time.perf_counter()
  entry["state"], losses = entry["steps"](entry["state"], entry["data"], chunk)
  jax.block_until_ready(losses)
  return (time.perf_counter() - start) / n_steps


def arithmetic_floor(rows: list, matmul_gflops_per_s: float, stream_gb_per_s: float,
                     step_ms: dict) -> dict:
  """A lower bound on the terms' time here, and the +fettle / alone step ratio it leaves:
  their FLOPs (XLA's count for this code) at the machine's matmul rate, plus the bytes
  that Sinkhorn's rounds must read at its stream rate (each of the N rounds depends on the
  last, so even a one-pass form reads every code set's [n, P] kernel once per round).
  This work runs no faster here however it is scheduled; only fewer FLOPs would."""
  gflop = sum(r["flops"] for r in rows) / 1e9
  sinkhorn_gb = sum(r.get("sinkhorn_gb", 0.0) for r in rows)
  arithmetic_ms = gflop / matmul_gflops_per_s * 1e3
  sinkhorn_ms = sinkhorn_gb / stream_gb_per_s * 1e3
  ms = arithmetic_ms + sinkhorn_ms
  base = next(iter(step_ms.values()))
  return {"gflop": gflop, "arithmetic_ms": arithmetic_ms, "sinkhorn_gb": sinkhorn_gb,
          "sinkhorn_ms": sinkhorn_ms, "ms": ms, "ratio": (base + ms) / base}


def cla_skeleton(code_sets: list, dim: int, n_iterations: int, n_steps: int = 4) -> dict:
  """The work L^CLA cannot shed at these shapes, and nothing else, as compiled programs of
  n_steps scanned steps (buffers reused, as in an epoch): per [n, P] code set the five
  [n, L] x [L, P]-sized products of its forward and backward (cosines; the code mixture and
  E C^T; the codebook's two gradients), and the exp plus Sinkhorn's 2N matrix-vector
  products. No normalization, loss, gathers or row sums. Returns name -> a timer: one call
  runs one program and returns its seconds per step (timed in main's alternating rounds)."""
  rng = np.random.default_rng(0)
  rows = [jnp.asarray(rng.normal(size=(n, dim)) / 8, jnp.float32) for n, _ in code_sets]
  codebooks = [jnp.asarray(rng.normal(size=(dim, p)) / 8, jnp.float32) for _, p in code_sets]

  def work(rows, codebooks, step, products, sinkhorn):
    total = 0.0
    for x, c in zip(rows, codebooks):
      x = x * (1.0 + 0.01 * step)  # fresh inputs per step, as a training batch
      scores = x @ c
      exps = scores
      if sinkhorn:
        exps = jnp.exp(scores)
        r = jnp.ones(x.shape[0])
        for _ in range(n_iterations):
          s = 1.0 / (r @ exps)
          r = 1.0 / (exps @ s)
        total += jnp.sum(r) + jnp.sum(s)
      if products:
        total += jnp.sum(exps @ c.T) + jnp.sum(exps @ (1.5 * c).T)
        total += jnp.sum(x.T @ exps) + jnp.sum((2.0 * x).T @ exps)
    return total

  def timer(fn):
    def seconds_per_step():
      start = time.perf_counter()
      jax.block_until_ready(fn(rows, codebooks))
      return (time.perf_counter() - start) / n_steps
    return seconds_per_step

  timers = {}
  for name, products, sinkhorn in (("products", True, False),
                                   ("products + exp + sinkhorn", True, True)):
    fn = jax.jit(lambda r, c, products=products, sinkhorn=sinkhorn: jax.lax.scan(
        lambda acc, i: (acc + work(r, c, i, products, sinkhorn), None), 0.0,
        jnp.arange(n_steps))[0])
    jax.block_until_ready(fn(rows, codebooks))  # compile
    timers[name] = timer(fn)
  return timers


def main(argv):
  del argv
  if _BASELINE.value:
    baseline_lib.load_baseline_fettle(_BASELINE.value)  # a bad path fails before building
  data = dataset_lib.load_dataset(_DATA.value)
  print(data.summary())
  device = f"{jax.devices()[0].device_kind}, {os.cpu_count()} cpus"
  print(f"device: {device}")
  rates = matmul_rates()
  stream = stream_rate()
  print("matmul rate: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
        + f"; stream rate {stream:.1f} GB/s", flush=True)
  report = {"data": data.summary(), "device": device, "matmul_gflops_per_s": rates,
            "stream_gb_per_s": stream, "steps": {}, "terms": {}}
  best_rate = max(rates.values())
  for backbone_name in _BACKBONES.value:
    variants = _ALIGNMENTS.value + [f"fettle@{p}" for p in _PROTOTYPES.value]
    if "reference" in _IMPLEMENTATIONS.value:
      variants.append("fettle@reference")
    if _BASELINE.value:
      variants.append("fettle@baseline")
    entries = {v: build_step(data, backbone_name, v) for v in variants}
    if _MESH.value:
      layout = next(iter(entries.values()))["layout"]
      print(f"mesh {layout.data_size}x{layout.model_size}: bytes on the first device, "
            "measured from the shards vs predicted by scripts/scaling_table.py", flush=True)
      for name, entry in entries.items():
        with variant_context(name):
          rows = memory_rows(data, entry, _STEPS.value)
        report.setdefault("memory", {}).setdefault(backbone_name, {})[name] = rows
        for r in rows:
          measured = r["measured_bytes"]
          print(f"  {backbone_name}+{name} {r['column']:24s} measured "
                f"{(measured or 0) / 2**20:9.1f} MiB | predicted "
                f"{r['predicted_bytes'] / 2**20:9.1f} MiB", flush=True)
    rows, skeleton = [], {}
    if _TERMS.value and "fettle" in entries:
      rows = term_rows(data, backbone_name, entries["fettle"])
      code_sets = [c for r in rows for c in r["code_sets"]]
      if code_sets:
        config = entries["fettle"]["config"]
        skeleton = cla_skeleton(code_sets, config.embedding_size,
                                config.fettle.sinkhorn_iterations)
    times = {a: [] for a in list(entries) + list(skeleton)}
    for name, entry in entries.items():
      with variant_context(name):  # compile (same static shapes as the timed calls)
        run_steps(entry, _STEPS.value, 0)
    for r in range(_ROUNDS.value):
      for name, entry in entries.items():
        times[name].append(run_steps(entry, _STEPS.value, 1 + r * _STEPS.value))
      for name, seconds_per_step in skeleton.items():
        times[name].append(seconds_per_step())
    ms = {a: statistics.median(t) * 1e3 for a, t in times.items()}
    base = ms[_ALIGNMENTS.value[0]]
    row = " | ".join(f"{a} {ms[a]:7.1f} ms ({ms[a] / base:4.2f}x)" for a in entries)
    print(f"{backbone_name:9s} | {row}", flush=True)
    report["steps"][backbone_name] = {a: ms[a] for a in entries}
    if rows:
      report["terms"][backbone_name] = rows
      for r in rows:
        print(f"  {r['term']:8s} {r['flops'] / 1e9:8.3f} GFLOP {r['ms']:8.2f} ms "
              f"{r['gflops_per_s']:6.1f} GFLOP/s ({100 * r['gflops_per_s'] / best_rate:4.1f}% of "
              f"matmul) | {r['items']} items, {r['users']} users -> bucket {r['bucket']}",
              flush=True)
      floor = arithmetic_floor(rows, best_rate, stream, report["steps"][backbone_name])
      report.setdefault("floor", {})[backbone_name] = floor
      print(f"  floor    {floor['gflop']:8.3f} GFLOP {floor['arithmetic_ms']:8.2f} ms at the "
            f"matmul rate + Sinkhorn {floor['sinkhorn_gb']:.2f} GB {floor['sinkhorn_ms']:.2f} ms "
            f"at the stream rate: +fettle >= {floor['ratio']:.2f}x of {backbone_name} alone",
            flush=True)
    if skeleton:
      others = sum(r["flops"] for r in rows if not r["code_sets"]) / best_rate / 1e6
      ratio = (base + others + ms["products + exp + sinkhorn"]) / base
      report.setdefault("cla_skeleton", {})[backbone_name] = dict(
          {k: ms[k] for k in skeleton}, ratio=ratio)
      print("  skeleton CLA's work alone, in the same rounds: " + ", ".join(
          f"{k} {ms[k]:.1f} ms" for k in skeleton) + f"; with the other terms' FLOPs at the "
          f"matmul rate ({others:.1f} ms) +fettle would be {ratio:.2f}x of {backbone_name} "
          "alone if nothing else cost time", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
