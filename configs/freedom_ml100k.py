"""FREEDOM on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/freedom_ml100k.py [--config.alignment=fettle|bm3]

Measured numbers: README "Results" (produced by scripts/ml100k_table.py).
"""

from configs import base
from configs import freedom_baby


def get_config():
  config = base.get_config()
  config.model = "freedom"
  config.freedom = freedom_baby.backbone_config()
  return base.use_ml100k(config)
