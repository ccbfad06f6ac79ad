"""VBPR on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/vbpr_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/vbpr_baby

Paper (Table 2): test Recall@20 0.0662. Not measured here: needs MMRec's baby/ features
(image_feat.npy, text_feat.npy), which are not available offline.
"""

from configs import base


def get_config():
  config = base.get_config("vbpr")
  config.data.path = "data/baby"
  # int: MMRec's VBPR has 64-d ID + 64-d content items and 128-d users; the backbone splits
  # embedding_size in half (ID | content) so every representation is 128-d.
  config.embedding_size = 128
  return config
