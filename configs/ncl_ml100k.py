"""NCL on the embedded MovieLens-100K data set (prepared on first use).

  python run.py --config=configs/ncl_ml100k.py

Add `--config.alignment=fettle` (or bm3) for the aligned variant; FETTLE runs at its
defaults here (not tuned for NCL). Not measured to convergence yet. Seen in a 25-epoch run
(seed 0): valid Recall@20 stays 0.013-0.03 for 7 epochs (the structure
term's gradient outweighs BPR's while the embeddings are small), then jumps to 0.14 at
epoch 8 and 0.16 at epoch 17.
"""

from configs import base


def get_config():
  config = base.get_config("ncl")
  config = base.use_ml100k(config)
  # RecBole's 1000 prototypes exceed ml100k's 943 users (every user its own cluster after
  # the clamp). Scaled as the authors' ml-1m setting: 1000 clusters for 6,040 users, ~6
  # users per prototype -> 150 for 943 users (~11 items per item prototype).
  config.ncl.num_clusters = 150
  # As configs/lightgcn_ml100k.py: LightGCN's valid Recall@20 stalls from epoch ~20 to ~70
  # on ml100k; NCL is LightGCN plus two small terms (not re-measured for NCL).
  config.patience = 50
  return config
