"""DirectAU on the embedded MovieLens-100K data set (prepared on first use).

  python run.py --config=configs/directau_ml100k.py

Add `--config.alignment=fettle` (or bm3) for the aligned variant, and
`--config.directau.encoder=lightgcn` for the LightGCN encoder. Not yet measured.
"""

from configs import base


def get_config():
  config = base.get_config("directau")
  config = base.use_ml100k(config)
  return config
