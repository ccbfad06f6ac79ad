"""Defaults shared by every experiment. Each field: type, meaning, paper/MMRec value.

Per-experiment files (`configs/<backbone>_<dataset>.py`) call `get_config(model)` here and
override what differs; any field can be overridden on the command line, e.g.
`python run.py --config=configs/lightgcn_baby.py --config.seed=1 --config.alignment=fettle`.

Each backbone's and alignment plug-in's own section comes from its module's
`default_config()`, next to its code. They are imported inside `get_config`, so importing a
config file does not import JAX (a launcher can read configs and set XLA flags first).
"""

import importlib
import os
import pkgutil

import ml_collections

ALIGNMENTS = ("fettle", "bm3")  # plug-ins with a config section (`none` has none)


def backbone_names():
  """Every module in fettle_jax/backbones/ (found without importing them)."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fettle_jax", "backbones")
  return sorted(m.name for m in pkgutil.iter_modules([folder]))


def get_config(model: str = "lightgcn") -> ml_collections.ConfigDict:
  """Shared fields, every backbone's section (so --config.model=X works on any config;
  each backbone reads only its own) and every plug-in's section."""
  config = ml_collections.ConfigDict()
  config.seed = 0                     # int: seeds init, batches and negatives (same seed -> same metrics)
  config.model = model                # str: backbone module in fettle_jax/backbones/
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
  config.steps_per_epoch = 0          # int: > 0 fixes the steps per epoch: batch = train / this (a multiple of 1024, never below batch_size), learning_rate x sqrt(batch / batch_size); 0 = batch_size as given
  config.max_epochs = 1000            # int: upper bound on training epochs
  config.patience = 20                # int: stop after this many validation passes without a better valid metric
  config.eval_every = 1               # int: epochs between validation passes (and after the last epoch)
  config.valid_users_sample = 0       # int: select the model on this many validation users drawn with `seed` (0 = all); test is always on all users
  config.selection_metric = "recall@20"  # str: validation metric for early stopping / model selection
  config.topk = (5, 10, 20, 50)       # tuple[int]: cut-offs K of every reported metric
  config.eval_batch_size = 4096       # int: users ranked per compiled evaluation batch
  config.checkpoint_every_epochs = 5  # int: how often the resumable 'latest' checkpoint is written
  config.tensorboard = False          # bool: write TensorBoard scalars to <workdir>/tensorboard (needs the `tensorboard` extra)

  # Device mesh ('data' x 'model' devices; -1 = all remaining). Default: every device on
  # 'data' (pure data parallelism); 'model' > 1 splits tables, codebooks and items ranked.
  config.mesh = importlib.import_module("fettle_jax.sharding").default_config()

  # Sections from each module's default_config(); alignment sections are read only when
  # config.alignment names them.
  for name in backbone_names():
    config[name] = importlib.import_module(f"fettle_jax.backbones.{name}").default_config()
  for name in ALIGNMENTS:
    config[name] = importlib.import_module(f"fettle_jax.alignment.{name}").default_config()
  # Speed only: the static branch sizes of FETTLE's fast path (0 = from the data, before
  # compiling); any values give the same results (fettle_jax/alignment/fettle/shapes.py).
  config.fettle_shapes = importlib.import_module(
      "fettle_jax.alignment.fettle").default_shape_hints()
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
