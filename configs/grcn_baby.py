"""GRCN on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/grcn_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/grcn_baby.py --config.alignment=fettle   # + FETTLE

Paper (FETTLE Table 2, Baby): GRCN test Recall@20 0.0841, +BM3 0.0822, +FETTLE 0.0900.
Not measured here yet.
"""

from configs import base


def get_config():
  config = base.get_config("grcn")
  config.data.path = "data/baby"
  return config
