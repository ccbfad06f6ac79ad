"""NCL on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/ncl_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/ncl_baby

NCL runs at RecBole's NCL.yaml setting (`ncl.default_config()`: 3 layers, 1000 prototypes per
side, ssl_reg 1e-7, proto_reg 8e-8, tau 0.1, 20 warm-up epochs). Paper (Table 2): test
Recall@20 0.0750. Ours on the LATTICE split: 0.0790 (best epoch 49 of 69;
RESULTS.md).
"""

from configs import base


def get_config():
  config = base.get_config("ncl")
  config.data.path = "data/baby"
  return config
