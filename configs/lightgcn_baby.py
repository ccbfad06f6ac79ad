"""LightGCN on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/lightgcn_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/lightgcn_baby

Paper (Table 2): test Recall@20 0.0754. Measured here: see README "Results".
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model = "lightgcn"
  config.data.path = "data/baby"
  return config
