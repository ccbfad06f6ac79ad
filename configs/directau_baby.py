"""DirectAU on Amazon Baby (MMRec `baby/` folder, or the LATTICE split in ../shared/data).

  python run.py --config=configs/directau_baby.py \
      --config.data.path=../shared/data/amazon-baby-5core --workdir=runs/directau_baby

Add `--config.directau.encoder=lightgcn` for the LightGCN encoder. The batch stays the
shared 2048 pairs (FETTLE's setting for every backbone); the DirectAU authors use 256 on
Amazon Beauty (README), and the uniformity term is computed within the batch.
Paper (Table 2): test Recall@20 0.0342. Ours on the LATTICE split: 0.0425
(best epoch 66 of 86; RESULTS.md).
"""

from configs import base


def get_config():
  config = base.get_config("directau")
  config.data.path = "data/baby"
  return config
