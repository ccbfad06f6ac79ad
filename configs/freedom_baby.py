"""FREEDOM + FETTLE on Amazon Baby (MMRec `baby/` folder with image_feat.npy, text_feat.npy).

  python run.py --config=configs/freedom_baby.py --config.data.path=<your baby/ folder>
  python run.py --config=configs/freedom_baby.py --config.alignment=none   # FREEDOM alone

FETTLE runs at the paper's best setting (Sec 4.6; `fettle.default_config()`): beta = alpha
= 1e-3, lambda_f 0.1, lambda_c 0.05, P = 10240 / 20480 prototypes. Paper (Table 2, Baby):
FREEDOM test Recall@20 0.0986, +FETTLE 0.1029. Not measured here: MMRec's Baby features
are not available offline (../shared/data/amazon-baby-5core has interactions only).
"""

import ml_collections

from configs import base


def backbone_config() -> ml_collections.ConfigDict:
  """`config.freedom`: FREEDOM hyper-parameters (fettle_jax/backbones/freedom.py)."""
  return ml_collections.ConfigDict({
      "knn_k": 10,  # int: neighbours per item in each modality's frozen kNN graph; MMRec 10
      # dict[str, float]: w_m of the summed item-item graph; MMRec mm_image_weight 0.1 ->
      # image 0.1, text 0.9; renormalized over present modalities, equal if one is unlisted.
      "modality_weights": ml_collections.ConfigDict({"image": 0.1, "text": 0.9}),
      "knn_block_size": 1024,  # int: item rows per block of the exact top-k (memory, not math)
      "n_mm_layers": 1,  # int: propagation layers on the item-item graph; MMRec 1
      "n_ui_layers": 2,  # int: LightGCN layers on the user-item graph (mean readout); MMRec 2
      "dropout": 0.8,  # float: share of user-item edges pruned per step; MMRec grid {0.8, 0.9}
      "reg_weight": 1e-4,  # float: weight of the modality BPR terms; MMRec grid {0, 1e-5..1e-3}
  })


def get_config():
  config = base.get_config()
  config.model = "freedom"
  config.data.path = "data/baby"
  config.freedom = backbone_config()
  config.alignment = "fettle"
  return config
