"""BPR-MF on the embedded MovieLens-100K data set (prepared on first use).

  python run.py --config=configs/bpr_ml100k.py

Add `--config.alignment=fettle` (or bm3) for the aligned variant. Measured numbers:
README "Results" (produced by scripts/ml100k_table.py).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model = "bpr"
  return base.use_ml100k(config)
