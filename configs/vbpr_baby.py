"""VBPR on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/vbpr_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/vbpr_baby

Paper (Table 2): test Recall@20 0.0662. Not measured here: needs MMRec's baby/ features
(image_feat.npy, text_feat.npy), which are not available offline.
"""

import ml_collections

from configs import base


def backbone_config() -> ml_collections.ConfigDict:
  """`config.vbpr`: VBPR hyper-parameters (fettle_jax/backbones/vbpr.py)."""
  return ml_collections.ConfigDict({
      # float: weight of the squared L2 on the batch's user / item reps; MMRec grids
      # {2, 1, 0.1, ..., 1e-5} for an un-squared norm, 1e-5 here as for BPR-MF (tune).
      "reg_weight": 1e-5,
  })


def get_config():
  config = base.get_config()
  config.model = "vbpr"
  config.data.path = "data/baby"
  # int: MMRec's VBPR has 64-d ID + 64-d content items and 128-d users; the backbone splits
  # embedding_size in half (ID | content) so every representation is 128-d.
  config.embedding_size = 128
  config.vbpr = backbone_config()
  return config
