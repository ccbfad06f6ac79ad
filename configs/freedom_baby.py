"""FREEDOM + FETTLE on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/freedom_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/freedom_baby.py --config.alignment=none   # FREEDOM alone

FETTLE runs at the paper's best setting (Sec 4.6; `fettle.default_config()`): beta = alpha
= 1e-3, lambda_f 0.1, lambda_c 0.05, P = 10240 / 20480 prototypes. Paper (Table 2, Baby):
FREEDOM test Recall@20 0.0986, +FETTLE 0.1029. Not measured here: MMRec's Baby features
are not available offline (../shared/data/amazon-baby-5core has interactions only).
"""

from configs import base


def get_config():
  config = base.get_config("freedom")
  config.data.path = "data/baby"
  config.alignment = "fettle"
  return config
