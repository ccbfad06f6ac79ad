"""Defaults shared by every experiment. Each field: type, meaning, paper/MMRec value.

Per-experiment files (`configs/<backbone>_<dataset>.py`) call `get_config()` here and
override what differs; any field can be overridden on the command line, e.g.
`python run.py --config=configs/lightgcn_baby.py --config.seed=1 --config.alignment=fettle`.
"""

import ml_collections

from fettle_jax.alignment import bm3
from fettle_jax.alignment import fettle


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                     # int: seeds init, batches and negatives (same seed -> same metrics)
  config.model = "lightgcn"           # str: backbone module in fettle_jax/backbones/
  config.alignment = "none"           # str: 'fettle' | 'bm3' | 'none'

  config.data = ml_collections.ConfigDict()
  config.data.path = "data/baby"      # str: folder in MMRec or LATTICE format (auto-detected)
  config.data.name = ""               # str: `<name>.inter` to read; '' = the folder's only .inter
  config.data.prepare = ""            # str: built-in data set to prepare first ('ml100k'); overrides path
  config.data.root = ""               # str: cache root for prepared data; '' = $FETTLE_JAX_DATA or ~/.cache/fettle_jax
  config.data.modalities = ml_collections.FieldReference(None, field_type=tuple)  # tuple[str] | None: content modalities to use; None = all found

  config.embedding_size = 64          # int: L, user/item embedding size (paper Sec 4.1)
  config.learning_rate = 1e-3         # float: Adam learning rate (paper Sec 4.1)
  config.batch_size = 2048            # int: BPR triples per step (paper Sec 4.1)
  config.max_epochs = 1000            # int: upper bound on training epochs
  config.patience = 20                # int: stop after this many epochs without a better valid metric
  config.selection_metric = "recall@20"  # str: validation metric for early stopping / model selection
  config.topk = (5, 10, 20, 50)       # tuple[int]: cut-offs K of every reported metric
  config.eval_batch_size = 4096       # int: users ranked per compiled evaluation batch
  config.checkpoint_every_epochs = 5  # int: how often the resumable 'latest' checkpoint is written

  # Backbone sections; each backbone reads only its own.
  config.bpr = ml_collections.ConfigDict({"reg_weight": 1e-5})  # float: L2 on batch embeddings
  config.lightgcn = ml_collections.ConfigDict({
      "n_layers": 2,        # int: propagation layers K
      "reg_weight": 1e-4,   # float: L2 on the batch's ego embeddings
  })

  # Alignment sections; read only when config.alignment names them.
  config.fettle = fettle.default_config()
  config.bm3 = bm3.default_config()
  return config


def use_ml100k(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Points a config at the embedded MovieLens-100K data set (prepared on first use).

  FETTLE's codebooks are scaled to the data: the paper's P (10240 / 20480) is meant for
  7k-23k items, exceeds ml100k's 1,682 items many times over, and would make every CPU
  step ~30x slower. 256 / 512 keep the paper's P_UI = 2 P_ITV ratio.
  """
  config.data.prepare = "ml100k"
  config.fettle.prototypes_item = 256
  config.fettle.prototypes_user = 512
  return config
