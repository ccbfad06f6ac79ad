"""SGL (SGL-ED) on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/sgl_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/sgl_baby

Hyper-parameters: `sgl.default_config()` (RecBole's SGL.yaml; L2 as lightgcn). Paper
(Table 2): test Recall@20 0.0820. Ours on the LATTICE split: 0.0847 (best
epoch 34 of 54; RESULTS.md).
"""

from configs import base


def get_config():
  config = base.get_config("sgl")
  config.data.path = "data/baby"
  return config
