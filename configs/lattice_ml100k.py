"""LATTICE on the embedded MovieLens-100K data set (text + kg modalities).

  python run.py --config=configs/lattice_ml100k.py [--config.alignment=fettle|bm3]

Not tuned on ml100k: MMRec's LATTICE values (`lattice.default_config()`).
"""

from configs import base


def get_config():
  config = base.get_config("lattice")
  config = base.use_ml100k(config)
  return config
