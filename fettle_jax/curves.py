"""Learning curves of a run as a CSV table and a PNG plot (fettle_jax/workdir.py decides
where they go and calls these when a run ends).

Per epoch: the backbone, alignment and total training loss (means over the epoch's
batches) and the validation selection metric (e.g. valid recall@20); the plot marks the
best (selected) epoch. Plotting uses matplotlib's Agg canvas directly (no global backend
switch, no display).
"""

import csv
from typing import Optional, Sequence

LOSSES = (("backbone_loss", "backbone loss"), ("alignment_loss", "alignment loss"),
          ("loss", "total loss"))


def metric_key(history: Sequence[dict]) -> Optional[str]:
  """The history's validation metric field, e.g. 'valid_recall@20'."""
  for record in history:
    for key in record:
      if key.startswith("valid_"):
        return key
  return None


def write_csv(path: str, history: Sequence[dict]) -> None:
  """One row per epoch: epoch, backbone_loss, alignment_loss, loss, valid_<metric>."""
  metric = metric_key(history)
  columns = ["epoch"] + [key for key, _ in LOSSES] + ([metric] if metric else [])
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for record in history:
      writer.writerow([record.get(c, "") for c in columns])  # str(float): shortest exact


def plot(path: str, history: Sequence[dict], best_epoch: Optional[int] = None,
         title: str = "") -> None:
  """Two panels over epochs: the three losses, and the validation metric (best marked)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  metric = metric_key(history)
  epochs = [r["epoch"] for r in history]
  figure = Figure(figsize=(11, 4.2), dpi=100)
  FigureCanvasAgg(figure)
  losses, valid = figure.subplots(1, 2)
  for (key, label), style in zip(LOSSES, ("-", "-", "--")):
    losses.plot(epochs, [r.get(key, float("nan")) for r in history], style, label=label)
  losses.set(title="training loss (mean over the epoch's batches)", xlabel="epoch",
             ylabel="loss")
  losses.legend()
  losses.grid(alpha=0.3)
  name = metric[len("valid_"):] if metric else "metric"
  if metric:
    values = [r.get(metric, float("nan")) for r in history]
    valid.plot(epochs, values, "-", color="C2", label=f"valid {name}")
    if best_epoch in epochs:
      valid.plot([best_epoch], [values[epochs.index(best_epoch)]], "o", color="C3")
  if best_epoch:
    valid.axvline(best_epoch, color="C3", linestyle=":",
                  label=f"best epoch {best_epoch} (selected)")
  valid.set(title=f"validation {name} (model selection)", xlabel="epoch", ylabel=name)
  if valid.get_legend_handles_labels()[0]:  # nothing to label before a validation pass
    valid.legend()
  valid.grid(alpha=0.3)
  for axes in (losses, valid):
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path)

