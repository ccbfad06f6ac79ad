"""DualGNN on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/dualgnn_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/dualgnn_baby.py --config.alignment=fettle   # + FETTLE

Hyper-parameters: `dualgnn.default_config()` (MMRec's DualGNN values: k = 40 co-occurring
users, softmax aggregation, 2 GCN layers, reg_weight 0.1). The user co-occurrence graph is
computed once and cached in `<data folder>/derived/`. Paper (Table 2, Baby): DualGNN test
Recall@20 0.0808, +FETTLE 0.0830. Not measured here on real Baby features.
"""

from configs import base


def get_config():
  config = base.get_config("dualgnn")
  config.data.path = "data/baby"
  return config
