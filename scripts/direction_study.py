"""Does FETTLE's alignment direction follow the informative modality? The direction study
on a synthetic twin, whose generator plants per item which modality is clean and which
is noisy (data_pipeline/synthetic.py: item_noise.npy).

  python scripts/direction_study.py --out=runs/direction_study [--twin=/tmp/baby_twin]
      [--epochs=1,2,5,10,20] [--max_epochs=100] [--prototypes=256,512]

1. BPR+FETTLE trains on the twin in segments (max_epochs = each of --epochs, resumed from
   the run's latest checkpoint, then on to early stopping); after each segment, and at
   initialization, Eq. 2's estimated feedback s_i^m is computed for every item from the
   latest parameters over all its train users, and Eq. 5's image/text direction is
   compared with the planted noise: it agrees when it points from the noisier modality to
   the cleaner one. Reported over the items with one clean and one noisy modality (where
   the direction matters; chance 50%) and over all items.
2. BPR and VBPR train on the same twin to early stopping: does BPR+FETTLE gain over BPR
   where VBPR (content features) does?
Writes directions.csv, directions.png, direction_study.md under --out; the runs are kept
there (a rerun reuses finished work). The twin is generated if --twin does not exist.
FETTLE's codebooks default to 256 / 512 (the ml100k scaling) to keep a CPU run short.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from configs import base
from data_pipeline import synthetic
from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import figures
from fettle_jax import train
from fettle_jax.alignment import modalities

_OUT = flags.DEFINE_string("out", "runs/direction_study", "Output folder (runs, tables).")
_TWIN = flags.DEFINE_string("twin", "/tmp/baby_twin", "Synthetic twin folder (generated if "
                            "missing: the Baby twin, seed 0).")
_EPOCHS = flags.DEFINE_list("epochs", ["1", "2", "5", "10", "20"],
                            "Epochs after which the directions are measured.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 100, "Cap of the early-stopped runs.")
_PROTOTYPES = flags.DEFINE_list("prototypes", ["256", "512"], "FETTLE's P_ITV, P_UI.")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed.")
_FEEDBACK = flags.DEFINE_enum("feedback", "dot", ["dot", "cosine"],
                              "Eq. 2's feedback score BPR+FETTLE trains with.")


def twin_config(model: str, alignment: str = "none"):
  config = base.get_config(model)
  config.data.path = _TWIN.value
  config.alignment = alignment
  config.seed = _SEED.value
  config.max_epochs = _MAX_EPOCHS.value
  config.fettle.prototypes_item, config.fettle.prototypes_user = (
      int(p) for p in _PROTOTYPES.value)
  config.fettle.feedback = _FEEDBACK.value
  return config


def measure(experiment, state, data, noise, mixed) -> dict:
  """Eq. 2's feedback over all train users and Eq. 5's image/text direction vs the plant."""
  config = experiment.config
  represent = jax.jit(lambda p, s, st: experiment.backbone.represent(p, s, st, config))
  reps = represent(state.params["backbone"], state.model_state, experiment.static)
  projectors = state.params["alignment"]["projectors"]
  names = modalities.modality_names(list(projectors))
  embeddings = modalities.all_item_modality_embeddings(
      projectors, reps, experiment.static.features, names, config.fettle.use_backbone_modalities)
  embeddings = np.asarray(embeddings)
  scores = figures.feedback_scores(np.asarray(reps.users), embeddings, data.train)
  image, text = names.index("image"), names.index("text")
  out = figures.planted_direction_agreement(scores[:, image], scores[:, text], noise[:, 0],
                                            noise[:, 1], mixed)
  out["id_on_top"] = float(np.mean(np.argmax(scores, axis=1) == names.index("id")))
  # Eq. 2 is a raw inner product, so a modality whose embedding is longer scores higher.
  # The same directions from unit-length i^m, and the mean length of the noisy modality's
  # embedding over the clean one's (mixed items), show how much of the answer is length.
  norms = np.linalg.norm(embeddings, axis=-1)
  unit = figures.feedback_scores(np.asarray(reps.users), embeddings / np.maximum(
      norms[..., None], 1e-12), data.train)
  unit_agreement = figures.planted_direction_agreement(
      unit[:, image], unit[:, text], noise[:, 0], noise[:, 1], mixed)
  out["agreement_mixed_unit_length"] = unit_agreement["agreement_mixed"]
  out["agreement_all_unit_length"] = unit_agreement["agreement_all"]
  noisy_first = noise[:, 0] > noise[:, 1]
  noisy_norm = np.where(noisy_first, norms[:, image], norms[:, text])
  clean_norm = np.where(noisy_first, norms[:, text], norms[:, image])
  out["noisy_over_clean_length"] = float(np.mean(noisy_norm[mixed] / clean_norm[mixed]))
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
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

  config = twin_config("bpr", "fettle")
  data = train.load_data(config)
  experiment = train.create_train_state(config, data)
  workdir = os.path.join(out, "bpr_fettle")
  measured_file = os.path.join(out, "directions.json")  # a rerun keeps earlier measurements
  rows = []
  if os.path.exists(measured_file):
    with open(measured_file) as f:
      rows = json.load(f)
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
      train.log(f"directions after epoch {loop['epoch']}: {rows[-1]}")
      with open(measured_file, "w") as f:
        json.dump(rows, f, indent=1)
  baselines = {name: train.train_and_evaluate(twin_config(name), os.path.join(out, name))
               for name in ("bpr", "vbpr")}
  baselines["bpr+fettle"] = result

  with open(os.path.join(out, "directions.csv"), "w") as f:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    f.write(",".join(columns) + "\n")
    f.writelines(",".join(str(r.get(c, "")) for c in columns) + "\n" for r in rows)
  epochs_axis = [r["epoch"] for r in rows]
  figures.line_chart(
      os.path.join(out, "directions.png"), "training epoch",
      {"items with one clean, one noisy modality": (
           epochs_axis, np.array([r["agreement_mixed"] for r in rows]), np.zeros(len(rows))),
       "all items": (epochs_axis, np.array([r["agreement_all"] for r in rows]),
                     np.zeros(len(rows))),
       "mixed items, directions from unit-length i^m": (
           epochs_axis, np.array([r.get("agreement_mixed_unit_length", np.nan) for r in rows]),
           np.zeros(len(rows)))},
      "share of image/text directions noisy -> clean",
      "BPR+FETTLE on the Baby twin: does Eq. 5 point to the planted clean modality?",
      {"chance": (0.5, 0.0)})
  def percent(row, key):
    return f"{100 * row[key]:.1f}%" if key in row else "n/a"

  lines = ["| epoch | items (mixed) | agreement, mixed items | agreement, all items | "
           "ID on top | agreement, mixed, unit-length i^m | noisy / clean length |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {r['epoch']} | {r['mixed_items']} | {percent(r, 'agreement_mixed')} | "
            f"{percent(r, 'agreement_all')} | {percent(r, 'id_on_top')} | "
            f"{percent(r, 'agreement_mixed_unit_length')} | "
            f"{r.get('noisy_over_clean_length', float('nan')):.3f} |" for r in rows]
  lines += ["", "| model | best epoch | test R@20 | test N@20 | valid R@20 |",
            "| --- | --- | --- | --- | --- |"]
  lines += [f"| {name} | {r['best_epoch']} | {r['test']['recall@20']:.4f} | "
            f"{r['test']['ndcg@20']:.4f} | {r['valid']['recall@20']:.4f} |"
            for name, r in baselines.items()]
  with open(os.path.join(out, "direction_study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main)
