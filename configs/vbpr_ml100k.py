"""VBPR on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/vbpr_ml100k.py [--config.alignment=fettle|bm3]

Test metrics (3 seeds, every alignment): RESULTS.md, made by scripts/experiments.py.
"""

from configs import base
from configs import vbpr_baby


def get_config():
  config = vbpr_baby.get_config()
  config.data.path = ""
  config = base.use_ml100k(config)
  # FETTLE setting tuned on validation by scripts/experiments.py (RESULTS.md).
  config.fettle.update(beta=0.0001, alpha=0.01, temperature_feedback=0.1,
                       temperature_cluster=0.05)
  return config
