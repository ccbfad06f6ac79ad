"""VBPR on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/vbpr_ml100k.py [--config.alignment=fettle|bm3]

Measured 2026-11-27 (seed 0, alignment none): test Recall@20 0.1608;
scripts/ml100k_table.py makes the full table (RESULTS.md).
"""

from configs import base
from configs import vbpr_baby


def get_config():
  config = vbpr_baby.get_config()
  config.data.path = ""
  return base.use_ml100k(config)
