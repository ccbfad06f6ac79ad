"""FETTLE: feedback-oriented multi-modal alignment (Li et al., SIGIR'24, Sec 3, Eq. 2-11).

Plug-in contract: `init(rng, data_info, config) -> params` and
`loss(params, reps, features, batch, rng, config) -> (weighted_loss, aux)`, where the
weighted loss is Eq. 11 without L^BPR and aux holds every unweighted term. `config` is the
top-level ConfigDict: we read `config.embedding_size` (L) and `config.fettle.*`
(`default_config`: the paper's hyper-parameters and switches).

Two implementations of one set of equations on one parameter tree
(`config.fettle.implementation`):
- `equations.py`, the reference: Eq. 2-11 written plainly, one function per equation;
- `fast.py` (+ `fast_clusters.py`), the default: the same values and gradients with less
  work; its static branch sizes (speed only) live in `config.fettle_shapes` (`shapes.py`).

Modalities are M = [ID] + sorted(content modalities of data_info.feature_dims); index 0 is
ID (`reps.items`). Everything is written for any |M|; with |M| < 2 the item-level terms
(ILA, DT, CLA_ITV) are 0 and FETTLE reduces to CLA_UI. The interpretation choices where the
paper is ambiguous are listed in `equations.py`.
"""

import importlib
import itertools
from types import ModuleType
from typing import Dict, Tuple

import jax
import ml_collections

from fettle_jax.alignment.modalities import modality_names
from fettle_jax.errors import ConfigError
from fettle_jax.layers import init_feature_projectors, init_linear, xavier_uniform
from fettle_jax.types import Array, Batch, DataInfo, Params, Representations

# config.fettle.implementation -> its module. Submodules are imported on use: each imports
# its parent package, so the package does not import them at module level (no cycle).
IMPLEMENTATIONS = {"fast": "fast", "reference": "equations"}


def _submodule(name: str) -> ModuleType:
  return importlib.import_module(f"{__name__}.{name}")


def default_config() -> ml_collections.ConfigDict:
  """FETTLE hyper-parameters (`config.fettle`); paper values from Sec 4.1 and 4.6."""
  return ml_collections.ConfigDict({
      "alpha": 1e-3,  # float: weight of the cluster-level terms L_UI + L_ITV (Eq. 11)
      "beta": 1e-3,  # float: weight of the item-level terms L_ILA + L_DT (Eq. 11)
      "temperature_feedback": 0.1,  # float: lambda_f of the ILA InfoNCE (Eq. 4); paper best 0.10
      "temperature_cluster": 0.05,  # float: lambda_c of the CLA softmax (Eq. 8-9); paper best 0.05
      "prototypes_item": 10240,  # int: P of the item codebook C^ITV (Eq. 7-8); paper 10240
      "prototypes_user": 20480,  # int: P of the user-item codebook C^UI (Eq. 9); paper 20480
      "sinkhorn_iterations": 3,  # int: N Sinkhorn-Knopp rounds (Eq. 7); paper 3
      "sinkhorn_epsilon": 0.05,  # float: tau, the Sinkhorn softmax temperature (Eq. 7); SwAV 0.05
      "directions": "pairwise",  # str: 'pairwise' (paper) or 'topmost' directions (Sec 3.2)
      "ila_negatives": "batch",  # str: ILA negatives: 'batch' unique items or 'all' items (Eq. 4)
      "bidirectional_threshold": -1.0,  # float: theta of Sec 4.4; <0 = off (paper sweeps 0..0.99)
      # str: Eq. 2's s_i^m from 'dot' = u^T i^m (as printed) or 'cosine' = cos(u, i^m); it
      # drives Eq. 5's directions and the bidirectional threshold theta alike.
      "feedback": "dot",
      "use_ila": True,  # bool: item-level alignment L_ILA (Table 3 ablation)
      "use_dt": True,  # bool: direction tuning L_DT (Table 3 ablation)
      # str: 'cosine' (default) scores DT with cos(u, i^{m->n}); 'dot' is Eq. 6 as printed
      # (u^T i^{m->n}), unbounded below in the loss: it inflates embedding norms.
      "dt_similarity": "cosine",
      "use_cla": True,  # bool: cluster-level alignment L_UI + L_ITV (Table 3 ablation)
      "projector_hidden": 64,  # int: hidden width of each residual FFN f^{m->n} (Eq. 3)
      "use_backbone_modalities": True,  # bool: prefer reps.modality_items[m] over own projectors
      # str: 'fast' (default) or 'reference' (equations.py, Eq. 2-11 as written): same
      # values and gradients, same parameters.
      "implementation": "fast",
  })


def default_shape_hints() -> ml_collections.ConfigDict:
  """`config.fettle_shapes`: the fast path's static branch sizes (speed only, `shapes.py`)."""
  return _submodule("shapes").default_shape_hints()


def fit_static_shapes(config, train_pairs, n_users: int, n_items: int):
  """train.py's hook: the speed-only branch sizes from the data (`shapes.fit_static_shapes`)."""
  return _submodule("shapes").fit_static_shapes(config, train_pairs, n_users, n_items)


def init_residual_ffn(rng: Array, dim: int, hidden: int) -> dict:
  """f^{m->n} of Eq. 3: Linear(L, H) -> ReLU -> Linear(H, L), Xavier-uniform weights."""
  r1, r2 = jax.random.split(rng)
  return {"hidden": init_linear(r1, dim, hidden), "output": init_linear(r2, hidden, dim)}


def init(rng: Array, data_info: DataInfo, config) -> Params:
  """Projectors (content features -> L), residual FFNs f^{m->n}, codebooks C^ITV and C^UI."""
  cfg, dim = config.fettle, config.embedding_size
  names = modality_names(data_info.feature_dims)
  r_proj, r_ffn, r_item, r_user = jax.random.split(rng, 4)
  pairs = list(itertools.permutations(range(len(names)), 2))  # every direction m -> n
  ffn_rngs = jax.random.split(r_ffn, max(len(pairs), 1))
  return {
      "projectors": init_feature_projectors(r_proj, data_info.feature_dims, dim),
      "alignment_ffn": {f"{names[m]}->{names[n]}":  # equations.direction_name
                        init_residual_ffn(r, dim, cfg.projector_hidden)
                        for (m, n), r in zip(pairs, ffn_rngs)},
      # Free parameters; columns are L2-normalized where used (cosines, Eq. 7-9).
      "codebook_item": xavier_uniform(r_item, (dim, cfg.prototypes_item)),
      "codebook_user": xavier_uniform(r_user, (dim, cfg.prototypes_user)),
  }


def check_config(cfg) -> None:
  """One-line errors for the string-valued switches (`config.fettle`); the train loop calls
  it before loading data, the loss again at trace time."""
  allowed = {"directions": ("pairwise", "topmost"), "dt_similarity": ("cosine", "dot"),
             "ila_negatives": ("batch", "all"), "feedback": ("dot", "cosine"),
             "implementation": tuple(IMPLEMENTATIONS)}
  defaults = default_config()
  for field, values in allowed.items():
    value = cfg.get(field, defaults[field])  # a config saved before the field existed
    if value not in values:
      raise ConfigError(f"fettle.{field} must be one of {values}, got {value!r}")


def implementation(cfg) -> ModuleType:
  """The module that computes the loss: `fast` or `equations` (the reference)."""
  return _submodule(IMPLEMENTATIONS[cfg.get("implementation", "fast")])


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  """alpha (L_UI^CLA + L_ITV^CLA) + beta (L^ILA + L^DT): Eq. 11 without L^BPR, and every
  unweighted term, by `config.fettle.implementation`."""
  check_config(config.fettle)
  return implementation(config.fettle).loss(params, reps, features, batch, rng, config)
