"""LATTICE + FETTLE on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/lattice_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/lattice_baby.py --config.alignment=none   # LATTICE alone

LATTICE at MMRec's values (`lattice.default_config()`), FETTLE at the paper's best setting
(`fettle.default_config()`). Paper (Table 2, Baby): LATTICE test Recall@20 0.0843,
+FETTLE 0.0915. Not measured here: MMRec's Baby features are not available offline.
"""

from configs import base


def get_config():
  config = base.get_config("lattice")
  config.data.path = "data/baby"
  config.alignment = "fettle"
  return config
