"""DualGNN on the embedded MovieLens-100K data set (text + kg modalities; prepared on first use).

  python run.py --config=configs/dualgnn_ml100k.py [--config.alignment=fettle|bm3]

Hyper-parameters: `dualgnn.default_config()` (MMRec's DualGNN values). Not tuned on ml100k.
"""

from configs import base


def get_config():
  config = base.get_config("dualgnn")
  config = base.use_ml100k(config)
  return config
