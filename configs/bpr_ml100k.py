"""BPR-MF on the embedded MovieLens-100K data set (prepared on first use).

  python run.py --config=configs/bpr_ml100k.py

Add `--config.alignment=fettle` (or bm3) for the aligned variant.
Test metrics (3 seeds, every alignment): RESULTS.md, made by scripts/experiments.py.
"""

from configs import base


def get_config():
  config = base.get_config("bpr")
  config = base.use_ml100k(config)
  # FETTLE setting tuned on validation by scripts/experiments.py (RESULTS.md).
  config.fettle.update(beta=0.01, alpha=0.0001, temperature_feedback=0.2,
                       temperature_cluster=0.1)
  return config
