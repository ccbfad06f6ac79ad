"""LightGCN on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/lightgcn_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/lightgcn_baby

Paper (Table 2): test Recall@20 0.0754. Ours on the LATTICE split: 0.0762
(best epoch 70 of 90; RESULTS.md).
"""

from configs import base


def get_config():
  config = base.get_config("lightgcn")
  config.data.path = "data/baby"
  return config
