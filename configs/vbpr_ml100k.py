"""VBPR on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/vbpr_ml100k.py [--config.alignment=fettle|bm3]

Measured numbers: README "Results" (produced by scripts/ml100k_table.py).
"""

from configs import base
from configs import vbpr_baby


def get_config():
  config = vbpr_baby.get_config()
  config.data.path = ""
  return base.use_ml100k(config)
