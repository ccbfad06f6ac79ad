"""Does FETTLE's alignment direction follow the informative modality? The direction study
on a synthetic twin, whose generator plants per item which modality is clean and which
is noisy (data_pipeline/synthetic.py: item_noise.npy).

  python scripts/direction_study.py --out=runs/direction_study [--twin=/tmp/baby_twin]
      [--seeds=0,1,2] [--feedbacks=dot,cosine] [--models=bpr,vbpr,freedom]
      [--epochs=1,2,5,10,20] [--max_epochs=100] [--prototypes=256,512]

For each seed (folder `s<seed>` under --out) and each Eq. 2 feedback (config.fettle.feedback):
1. BPR+FETTLE trains on the twin in segments (max_epochs = each of --epochs, resumed from
   the run's latest checkpoint, then on to early stopping); after each segment, and at
   initialization, Eq. 2's feedback s_i^m is computed for every item from the latest
   parameters over all its train users, by both choices (dot and cosine), and Eq. 5's
   image/text direction is compared with the planted noise: it agrees when it points from
   the noisier modality to the cleaner one. Reported over the items with one clean and one
   noisy modality (where the direction matters; chance 50%) and over all items.
2. The test table: every --models backbone vanilla and + FETTLE with each feedback, trained
   to early stopping (BPR+FETTLE is the run of step 1), each with its
   configs/<backbone>_baby.py.
Writes directions.csv, directions.png and direction_study.md (mean +- std over the seeds
that finished) under --out. Every run is kept; a rerun reuses finished work, so several
processes may share --out with different --seeds / --feedbacks, and a last one with
--only_table tabulates. The twin is generated if --twin does not exist. FETTLE's codebooks
default to 256 / 512 (the ml100k scaling) to keep a CPU run short.
"""

import importlib
import json
import os
from typing import Dict, List, Optional

from absl import flags
from absl import logging
import jax
import numpy as np

from data_pipeline import synthetic
from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import figures
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.alignment import modalities
from fettle_jax.tools import command

_OUT = flags.DEFINE_string("out", "runs/direction_study", "Output folder (runs, tables).")
_TWIN = flags.DEFINE_string("twin", "/tmp/baby_twin", "Synthetic twin folder (generated if "
                            "missing: the Baby twin, seed 0).")
_EPOCHS = flags.DEFINE_list("epochs", ["1", "2", "5", "10", "20"],
                            "Epochs after which the directions are measured.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 100, "Cap of the early-stopped runs.")
_PROTOTYPES = flags.DEFINE_list("prototypes", ["256", "512"], "FETTLE's P_ITV, P_UI.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds.")
_FEEDBACKS = flags.DEFINE_list("feedbacks", ["dot", "cosine"],
                               "Eq. 2's feedback scores the FETTLE runs train with.")
_MODELS = flags.DEFINE_list("models", ["bpr", "vbpr"], "Backbones of the test table.")
_ONLY_TABLE = flags.DEFINE_bool("only_table", False, "Train nothing; tabulate what exists.")

KINDS = ("dot", "cosine")


def twin_config(model: str, seed: int, alignment: str = "none", feedback: str = "dot"):
  """configs/<model>_baby.py (the paper's Baby settings, e.g. VBPR's 128-d representations)
  pointed at the twin, with the study's codebooks, seed and FETTLE feedback."""
  config = importlib.import_module(f"configs.{model}_baby").get_config()
  config.data.path = _TWIN.value
  config.alignment = alignment
  config.seed = seed
  config.max_epochs = _MAX_EPOCHS.value
  config.fettle.prototypes_item, config.fettle.prototypes_user = (
      int(p) for p in _PROTOTYPES.value)
  config.fettle.feedback = feedback
  return config


def measure(experiment, state, data, noise, mixed) -> dict:
  """Eq. 2's feedback over all train users, by both choices, and Eq. 5's image/text
  direction vs the plant; `agreement_*` by the run's own choice."""
  config = experiment.config
  represent = jax.jit(lambda p, s, st: experiment.backbone.represent(p, s, st, config))
  reps = represent(state.params["backbone"], state.model_state, experiment.static)
  projectors = state.params["alignment"]["projectors"]
  names = modalities.modality_names(list(projectors))
  embeddings = modalities.all_item_modality_embeddings(
      projectors, reps, experiment.static.features, names, config.fettle.use_backbone_modalities)
  embeddings = np.asarray(embeddings)
  image, text = names.index("image"), names.index("text")
  out = {}
  for kind in KINDS:
    scores = figures.feedback_scores(np.asarray(reps.users), embeddings, data.train, kind)
    agreement = figures.planted_direction_agreement(scores[:, image], scores[:, text],
                                                    noise[:, 0], noise[:, 1], mixed)
    out["mixed_items"] = agreement["mixed_items"]
    out[f"agreement_mixed_{kind}"] = agreement["agreement_mixed"]
    out[f"agreement_all_{kind}"] = agreement["agreement_all"]
    if kind == config.fettle.feedback:
      out["agreement_mixed"] = agreement["agreement_mixed"]
      out["agreement_all"] = agreement["agreement_all"]
      out["id_on_top"] = float(np.mean(np.argmax(scores, axis=1) == names.index("id")))
  # A raw inner product scores a longer embedding higher: the noisy modality's mean length
  # over the clean one's (mixed items) shows how much of the dot answer is length.
  norms = np.linalg.norm(embeddings, axis=-1)
  noisy_first = noise[:, 0] > noise[:, 1]
  noisy_norm = np.where(noisy_first, norms[:, image], norms[:, text])
  clean_norm = np.where(noisy_first, norms[:, text], norms[:, image])
  out["noisy_over_clean_length"] = float(np.mean(noisy_norm[mixed] / clean_norm[mixed]))
  return out


def read_json(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def final_metrics(workdir: str) -> Optional[dict]:
  """The run's metrics.json once its last, early-stopped segment has ended, else None: every
  segment writes one, so its presence alone does not mean the run is done."""
  metrics = read_json(workdir_lib.metrics_path(workdir), None)
  if metrics is None or metrics["config"]["max_epochs"] != _MAX_EPOCHS.value:
    return None
  return metrics


def direction_run(seed: int, feedback: str, data, noise, mixed):
  """BPR+FETTLE trained in segments, measured after each; returns (rows, result or None)."""
  folder = os.path.join(_OUT.value, f"s{seed}")
  workdir = os.path.join(folder, f"bpr_fettle_{feedback}")
  measured_file = os.path.join(folder, f"directions_{feedback}.json")
  rows = read_json(measured_file, [])
  result = final_metrics(workdir)
  if _ONLY_TABLE.value or (result is not None and rows and rows[-1]["epoch"] >= result["epochs"]):
    return rows, result
  config = twin_config("bpr", seed, "fettle", feedback)
  experiment = train.create_train_state(config, data)
  if not rows:
    rows = [dict(epoch=0, **measure(experiment, experiment.state, data, noise, mixed))]
  segments = sorted(int(e) for e in _EPOCHS.value)
  result = None
  for i, epochs in enumerate(segments + [_MAX_EPOCHS.value]):
    last = i == len(segments)
    if not last and epochs <= rows[-1]["epoch"]:
      continue  # measured by an earlier invocation
    segment = config.copy_and_resolve_references()
    segment.max_epochs = epochs
    segment.patience = config.patience if last else 10**6  # early stopping only at the end
    result = train.train_and_evaluate(segment, workdir)
    checkpoints = checkpoint_lib.Checkpoints(workdir, experiment.layout.state)
    try:
      state, loop = checkpoints.restore_latest()
    finally:
      checkpoints.close()
    if loop["epoch"] > rows[-1]["epoch"]:
      rows.append(dict(epoch=loop["epoch"], **measure(experiment, state, data, noise, mixed)))
      train.log(f"seed {seed}, {feedback}: directions after epoch {loop['epoch']}: {rows[-1]}")
      with open(measured_file, "w") as f:
        json.dump(rows, f, indent=1)
  return rows, result


def table_run(seed: int, model: str, feedback: Optional[str]):
  """A test-table run (vanilla if feedback is None); its metrics.json content or None."""
  name = model if feedback is None else f"{model}_fettle_{feedback}"
  workdir = os.path.join(_OUT.value, f"s{seed}", name)
  if workdir_lib.finished(workdir) or _ONLY_TABLE.value:
    return read_json(workdir_lib.metrics_path(workdir), None)
  config = (twin_config(model, seed) if feedback is None
            else twin_config(model, seed, "fettle", feedback))
  return train.train_and_evaluate(config, workdir)


def mean_std(values, scale=1.0, digits=1, suffix="%"):
  values = [scale * v for v in values]
  if not values:
    return "n/a"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}{suffix}"


def direction_lines(feedback: str, per_seed: Dict[int, list], finished: List[int]) -> List[str]:
  """Per epoch, mean +- std over the seeds measured at that epoch; the early-stopped end of
  the `finished` seeds (the last row of each) in a row of its own."""
  segments = {seed: rows[:-1] if seed in finished else rows for seed, rows in per_seed.items()}
  epochs = sorted({r["epoch"] for rows in segments.values() for r in rows})
  finals = [per_seed[seed][-1] for seed in finished if per_seed.get(seed)]
  lines = [f"BPR+FETTLE trained with `feedback={feedback}`:", "",
           "| epoch | seeds | agreement, mixed items | agreement, all items | mixed, by dot "
           "scores | mixed, by cosine scores | ID on top | noisy / clean length |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  def row(label, picked):
    return (f"| {label} | {len(picked)} | "
            + " | ".join(mean_std([r[k] for r in picked], 100.0) for k in (
                "agreement_mixed", "agreement_all", "agreement_mixed_dot",
                "agreement_mixed_cosine", "id_on_top"))
            + f" | {mean_std([r['noisy_over_clean_length'] for r in picked], 1.0, 2, '')} |")
  for epoch in epochs:
    lines.append(row(epoch, [r for rows in segments.values() for r in rows
                             if r["epoch"] == epoch]))
  if finals:
    lines.append(row(f"early stop ({', '.join(str(r['epoch']) for r in finals)})", finals))
  return lines


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  command.install_stop_handlers()  # SIGTERM / Ctrl-C: the run in progress stops resumable
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  if not os.path.exists(os.path.join(_TWIN.value, "item_noise.npy")):
    train.log(f"generating the Baby twin in {_TWIN.value}")
    synthetic.write(synthetic.generate("baby", seed=0), _TWIN.value)
  noise = np.load(os.path.join(_TWIN.value, "item_noise.npy"))
  with open(os.path.join(_TWIN.value, "metadata.json")) as f:
    plant = json.load(f)["params"]
  clean = noise <= plant["clean_high"]
  noisy = noise >= plant["noisy_low"]
  mixed = (clean[:, 0] & noisy[:, 1]) | (noisy[:, 0] & clean[:, 1])
  data = train.load_data(twin_config("bpr", 0))
  seeds = [int(s) for s in _SEEDS.value]

  directions, results = {}, {}  # directions[feedback][seed] = rows
  for seed in seeds:
    for feedback in _FEEDBACKS.value:
      rows, result = direction_run(seed, feedback, data, noise, mixed)
      directions.setdefault(feedback, {})[seed] = rows
      results[("bpr", feedback, seed)] = result
    for model in _MODELS.value:
      results[(model, None, seed)] = table_run(seed, model, None)
      for feedback in _FEEDBACKS.value:
        if model != "bpr":
          results[(model, feedback, seed)] = table_run(seed, model, feedback)

  with open(os.path.join(out, "directions.csv"), "w") as f:
    columns = ["feedback", "seed"] + list(dict.fromkeys(
        c for by_seed in directions.values() for rows in by_seed.values() for r in rows
        for c in r))
    f.write(",".join(columns) + "\n")
    for feedback, by_seed in directions.items():
      for seed, rows in by_seed.items():
        f.writelines(",".join(str(dict(r, feedback=feedback, seed=seed).get(c, ""))
                              for c in columns) + "\n" for r in rows)
  series = {}
  for feedback, by_seed in directions.items():
    epochs = sorted({r["epoch"] for rows in by_seed.values() for r in rows})
    values = [[r["agreement_mixed"] for rows in by_seed.values() for r in rows
               if r["epoch"] == e] for e in epochs]
    series[f"trained with {feedback} feedback (mixed items)"] = (
        epochs, np.array([np.mean(v) for v in values]),
        np.array([np.std(v) for v in values]))
  figures.line_chart(
      os.path.join(out, "directions.png"), "training epoch", series,
      "share of image/text directions noisy -> clean",
      "BPR+FETTLE on the Baby twin: does Eq. 5 point to the planted clean modality?",
      {"chance": (0.5, 0.0)})

  lines = []
  for feedback, by_seed in directions.items():
    finished = [seed for seed in by_seed if results.get(("bpr", feedback, seed)) is not None]
    lines += direction_lines(feedback, by_seed, finished) + [""]
  lines += ["| model | FETTLE feedback | seeds | best epoch | test R@20 | test N@20 | "
            "valid R@20 |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for model in _MODELS.value:
    for feedback in [None] + list(_FEEDBACKS.value):
      done = [results.get((model, feedback, seed)) for seed in seeds]
      done = [r for r in done if r is not None]
      lines.append(
          f"| {model} | {feedback or '- (vanilla)'} | {len(done)} | "
          f"{mean_std([r['best_epoch'] for r in done], 1.0, 0, '')} | "
          + " | ".join(mean_std([r[split][metric] for r in done], 1.0, 4, "") for split, metric
                       in (("test", "recall@20"), ("test", "ndcg@20"), ("valid", "recall@20")))
          + " |")
  with open(os.path.join(out, "direction_study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  command.run_app(main, __name__)
