"""SGL (SGL-ED) on the embedded MovieLens-100K data set (prepared on first use).

  python run.py --config=configs/sgl_ml100k.py

Add `--config.alignment=fettle` (or bm3) for the aligned variant. Not tuned on ml100k.
"""

from configs import base


def get_config():
  config = base.get_config("sgl")
  config = base.use_ml100k(config)
  # As LightGCN on ml100k (configs/lightgcn_ml100k.py): valid Recall@20 can stall for tens
  # of epochs before rising again, so early stopping waits longer.
  config.patience = 50
  return config
