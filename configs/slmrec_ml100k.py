"""SLMRec on the embedded MovieLens-100K data set (text + kg modalities; prepared on first use).

  python run.py --config=configs/slmrec_ml100k.py [--config.alignment=fettle|bm3]

Hyper-parameters: `slmrec.default_config()` (MMRec's SLMRec.yaml). FAC stages: text, then kg
(unlisted modalities follow the configured image, audio, text order). Not tuned on ml100k.
"""

from configs import base


def get_config():
  config = base.get_config("slmrec")
  return base.use_ml100k(config)
