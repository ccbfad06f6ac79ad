"""SLMRec on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/slmrec_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/slmrec_baby.py --config.alignment=fettle   # + FETTLE

Hyper-parameters: `slmrec.default_config()` (MMRec's SLMRec.yaml; FAC stages image, then
text). Paper (Table 2, Baby): SLMRec test Recall@20 0.0820, +FETTLE 0.0847. Not measured here.
"""

from configs import base


def get_config():
  config = base.get_config("slmrec")
  config.data.path = "data/baby"
  return config
