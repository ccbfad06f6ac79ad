"""BPR-MF on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/bpr_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/bpr_baby

Paper (Table 2): test Recall@20 0.0595. Ours on the LATTICE split: 0.0570
(best epoch 12 of 32; RESULTS.md).
"""

from configs import base


def get_config():
  config = base.get_config("bpr")
  config.data.path = "data/baby"
  return config
