"""GRCN on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/grcn_ml100k.py [--config.alignment=fettle|bm3]

Not tuned on ml100k: GRCN's MMRec defaults, FETTLE at its paper setting.
"""

from configs import base


def get_config():
  config = base.get_config("grcn")
  config = base.use_ml100k(config)
  return config
