"""SLMRec (Tao et al., IEEE TMM'22, "Self-supervised Learning for Multimedia Recommendation").

Modality-specific graph encoders (the paper's multi-modal graph encoder): the item side of
each branch b in {ID} + content modalities M starts from its own layer-0 embedding,
  e_i^ID = the item ID embedding,   e_i^m = W_m x_i^m + b_m   (a linear map of the raw features),
the user side of every branch from the same user ID embedding; each branch runs LightGCN on
the normalized user-item graph D^-1/2 A D^-1/2 (He et al. 2020, Eq. 3-4: the mean of layers
0..K). The branches share the graph and propagation is linear and column-wise, so they run as
ONE propagation of the [n, |B| L] concatenation. Fusion ('concat'): u = W_u [u^ID || u^m..] +
b_u and i = W_i [i^ID || i^m..] + b_i; ('mean'): the mean over branches. Scores are u . i.
`modality_items` exposes each content branch's own item representation i^m (after GCN).

Self-supervised task (one of the paper's three, `ssl_task`), an InfoNCE with cosine
similarity / ssl_temp over the batch's distinct positive items (the others as negatives):
  'FAC' fine-and-coarse (after MMV, Alayrac et al. NeurIPS'20): content modalities in a
        fine-to-coarse order m_1..m_k (default image, audio, text: the paper's v, a, t);
        z_0 = i^ID, z_j = G_j z_{j-1} (linear), and stage j contrasts z_j with H_j i^{m_j}
        (linear) in a d_j-dim space: d_j = L, the coarsest (last, k >= 2) L / 2;
  'FD'  feature dropout: two views, each drops every element of the item layer-0 inputs
        (all branches) with rate rho (inverted-dropout scaling 1 / (1 - rho));
  'FM'  feature masking: two views, each zeroes an item's whole branch input vector with
        rate rho (a masked modality, not single elements);
  'FD+FM' both, dropout then masking. Each view runs the whole encoder + fusion; the two
        views' fused item representations are contrasted.
Loss: main + ssl_alpha * L_ssl / B + weight_decay * ||theta||^2 / 2. Main: BPR on the fused
representations (FETTLE Eq. 10; the project's backbone contract), or main_loss='softmax'.

Where we differ from MMRec's SLMRec (facts, not code, carried over):
- main task: MMRec trains with an in-batch softmax (cross-entropy over the batch's cosine
  user-positive similarities / temp 0.2); the default here is BPR, as the project specifies
  for every backbone FETTLE plugs into; main_loss='softmax' gives MMRec's objective;
- SSL sums InfoNCE over the batch's *distinct* positive items (`losses.distinct_rows_info_nce`)
  divided by the batch size B, instead of a mean over batch rows with repeats (as SGL here);
- weight decay: MMRec passes weight_decay 1e-4 to torch Adam (coupled: + wd * theta on every
  gradient); the shared optimizer is plain Adam, so the same gradient comes from the loss term
  wd / 2 * ||theta||^2 over every backbone parameter (`losses.weight_decay_penalty`). MMRec's
  config also lists a `reg` grid; no second L2 term is modelled here;
- FD / FM views augment the layer-0 item inputs of the encoder (the paper's item features in
  the latent space) and are contrasted directly, without an extra projection head; FM masks
  each (item, branch) vector independently at rate rho, so every view masks a random subset
  of modalities per item;
- any set of content modalities: FAC stages follow `fac_order` (unlisted ones appended, sorted),
  so MovieLens' (text, kg) and Amazon's (image, text) both work.
Note: the item fusion bias b_i cancels in BPR (u . (i_pos - i_neg)) and in FAC (which reads
the branches), so it gets no gradient there; it does under 'softmax', FD / FM and alignment.
"""

from typing import List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.errors import ConfigError
from fettle_jax.types import Array, Batch, DataInfo, Representations

SSL_TASKS = ("FAC", "FD", "FM", "FD+FM")
FUSIONS = ("concat", "mean")
MAIN_LOSSES = ("bpr", "softmax")


def default_config() -> ml_collections.ConfigDict:
  """`config.slmrec`; MMRec's SLMRec.yaml (first value of a grid). Its recdim 64 is the shared
  config.embedding_size; its learning_rate grid (first 1e-4) is the shared config.learning_rate."""
  return ml_collections.ConfigDict({
      "n_layers": 3,  # int: LightGCN layers K of every branch; MMRec layer_num 3
      # str: 'FAC' | 'FD' | 'FM' | 'FD+FM' (module docstring); MMRec ssl_task 'FAC'.
      "ssl_task": "FAC",
      "ssl_alpha": 0.01,  # float: weight of L_ssl; MMRec grid [0.01, 0.05, 0.1, 0.5, 1.0]
      "ssl_temp": 0.1,  # float: InfoNCE temperature of L_ssl; MMRec grid [0.1, 0.2, 0.5, 1.0]
      "dropout_rate": 0.3,  # float: rho of FD (elements) and FM (modalities); MMRec 0.3
      "fusion": "concat",  # str: 'concat' (linear maps) | 'mean'; MMRec mm_fusion_mode 'concat'
      # str: 'bpr' (project spec, FETTLE Eq. 10) | 'softmax' (MMRec's in-batch softmax).
      "main_loss": "bpr",
      "temperature": 0.2,  # float: main_loss='softmax' temperature; MMRec temp 0.2
      "weight_decay": 1e-4,  # float: torch-Adam-style decay, wd/2 ||theta||^2; MMRec 1e-4
      # tuple[str]: FAC's fine-to-coarse modality order; MMRec / the paper v, a, t.
      "fac_order": ("image", "audio", "text"),
  })


def check_config(cfg) -> None:
  """One-line errors for `config.slmrec` (the train loop calls it before loading data)."""
  if cfg.ssl_task not in SSL_TASKS:
    raise ConfigError(f"slmrec.ssl_task must be one of {SSL_TASKS}, got {cfg.ssl_task!r}")
  if cfg.fusion not in FUSIONS:
    raise ConfigError(f"slmrec.fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
  if cfg.main_loss not in MAIN_LOSSES:
    raise ConfigError(f"slmrec.main_loss must be one of {MAIN_LOSSES}, got {cfg.main_loss!r}")
  if not 0.0 <= cfg.dropout_rate < 1.0:
    raise ConfigError(f"slmrec.dropout_rate must lie in [0, 1), got {cfg.dropout_rate}")
  for name in ("ssl_temp", "temperature"):
    if cfg[name] <= 0:
      raise ConfigError(f"slmrec.{name} must be positive, got {cfg[name]}")
  for name in ("ssl_alpha", "weight_decay", "n_layers"):
    if cfg[name] < 0:
      raise ConfigError(f"slmrec.{name} must not be negative, got {cfg[name]}")
  if isinstance(cfg.fac_order, str) or not all(isinstance(m, str) for m in cfg.fac_order):
    raise ConfigError(f"slmrec.fac_order must be a tuple of modality names, got "
                      f"{cfg.fac_order!r}")


def build_graph(train_pairs, n_users, n_items, features, config):
  if not features:
    raise ConfigError("SLMRec needs at least one content modality (its modality graph "
                      "encoders and self-supervised task are built on the features)")
  del config
  train_pairs = np.asarray(train_pairs)
  return {"user_item": graphs.user_item_graph(train_pairs[:, 0], train_pairs[:, 1],
                                              n_users, n_items)}


def fac_order(names: Sequence[str], configured: Sequence[str]) -> List[str]:
  """FAC's fine-to-coarse stages: the configured order restricted to present modalities,
  then the unlisted ones, sorted."""
  listed = [m for m in configured if m in names]
  return listed + sorted(m for m in names if m not in listed)


def fac_dims(n_stages: int, size: int) -> List[int]:
  """d_j of each FAC space: L, except the coarsest (last of >= 2) with L / 2 (MMV's coarse
  space is half its fine one)."""
  return [max(1, size // 2) if n_stages >= 2 and j == n_stages - 1 else size
          for j in range(n_stages)]


def init(rng, data_info: DataInfo, config):
  cfg = config.slmrec
  size = config.embedding_size
  table_rng, proj_rng, fusion_rng, fac_rng = jax.random.split(rng, 4)
  params = layers.init_embedding_tables(table_rng, data_info.n_users, data_info.n_items, size)
  params["projectors"] = layers.init_feature_projectors(proj_rng, data_info.feature_dims, size)
  n_branches = 1 + len(data_info.feature_dims)
  if cfg.fusion == "concat":
    user_rng, item_rng = jax.random.split(fusion_rng)
    params["user_fusion"] = layers.init_linear(user_rng, n_branches * size, size)
    params["item_fusion"] = layers.init_linear(item_rng, n_branches * size, size)
  if cfg.ssl_task == "FAC":
    order = fac_order(list(data_info.feature_dims), cfg.fac_order)
    dims = fac_dims(len(order), size)
    rngs = jax.random.split(fac_rng, 2 * len(order))
    params["fac"] = {
        name: {"chain": layers.init_linear(rngs[2 * j], size if j == 0 else dims[j - 1],
                                           dims[j]),
               "content": layers.init_linear(rngs[2 * j + 1], size, dims[j])}
        for j, name in enumerate(order)}
  return params


# ----------------------------------------------------------------------------- encoder


def content_names(params) -> List[str]:
  return sorted(params["projectors"])


def item_inputs(params, features) -> Array:
  """Layer-0 item embeddings of every branch, [n_items, 1 + |M|, L]: ID, then W_m x^m + b_m
  for the content modalities in sorted order."""
  projected = [layers.linear(params["projectors"][m], features[m]) for m in content_names(params)]
  return jnp.stack([params["item_embedding"]] + projected, axis=1)


def encode(params, graph: graphs.Graph, items0: Array, n_layers: int):
  """LightGCN per branch, all branches in one propagation of the concatenation: returns
  (users [n_users, |B|, L], items [n_items, |B|, L]), each the mean of layers 0..K."""
  users = params["user_embedding"]
  n_users, size = users.shape
  n_items, n_branches, _ = items0.shape
  ego = jnp.concatenate([jnp.tile(users, (1, n_branches)),  # every branch starts from u^ID
                         items0.reshape(n_items, n_branches * size)], axis=0)
  final = graphs.mean_of_layers(graph, ego, n_layers)
  return (final[:n_users].reshape(n_users, n_branches, size),
          final[n_users:].reshape(n_items, n_branches, size))


def fuse(params, branches: Array, side: str, fusion: str) -> Array:
  """[n, |B|, L] -> [n, L]: W [b_1 || ... || b_|B|] + b ('concat') or the branch mean."""
  if fusion == "concat":
    return layers.linear(params[f"{side}_fusion"], branches.reshape(branches.shape[0], -1))
  return jnp.mean(branches, axis=1)


def _forward(params, static, config):
  cfg = config.slmrec
  items0 = item_inputs(params, static.features)
  user_branches, item_branches = encode(params, static.graph["user_item"], items0,
                                        cfg.n_layers)
  modality = {m: item_branches[:, 1 + j] for j, m in enumerate(content_names(params))}
  reps = Representations(fuse(params, user_branches, "user", cfg.fusion),
                         fuse(params, item_branches, "item", cfg.fusion), modality)
  return reps, items0, item_branches


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return _forward(params, static, config)[0]


# ----------------------------------------------------------------------------- augmentations


def feature_dropout(rng: Array, x: Array, rate: float) -> Array:
  """FD: every element kept with probability 1 - rate and scaled by 1 / (1 - rate)."""
  if rate <= 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def feature_masking(rng: Array, x: Array, rate: float) -> Array:
  """FM on [n_items, |B|, L]: each item's branch vector zeroed whole with probability rate."""
  if rate <= 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape[:2])
  return jnp.where(keep[..., None], x, 0.0)


def augment(rng: Array, items0: Array, task: str, rate: float) -> Array:
  """One view of the layer-0 item inputs under 'FD', 'FM' or 'FD+FM'."""
  dropout_rng, mask_rng = jax.random.split(rng)
  if "FD" in task:
    items0 = feature_dropout(dropout_rng, items0, rate)
  if "FM" in task:
    items0 = feature_masking(mask_rng, items0, rate)
  return items0


# ----------------------------------------------------------------------------- losses


def fac_loss(params, item_branches: Array, ids: Array, temperature: float, order) -> Array:
  """Fine-and-coarse InfoNCE: sum over stages j of the distinct-id InfoNCE between
  z_j = G_j z_{j-1} (z_0 = i^ID) and H_j i^{m_j}, over the items `ids`."""
  names = content_names(params)
  chain = item_branches[:, 0]
  total = 0.0
  for name in order:
    head = params["fac"][name]
    chain = layers.linear(head["chain"], chain)  # the ID side, one space coarser per stage
    content = layers.linear(head["content"], item_branches[:, 1 + names.index(name)])
    total += losses.distinct_rows_info_nce(chain, content, ids, temperature)
  return total


def view_loss(params, static, items0: Array, ids: Array, rng: Array, cfg) -> Array:
  """FD / FM: distinct-id InfoNCE between two augmented views' fused item representations."""
  views = []
  for view_rng in jax.random.split(rng):
    _, items = encode(params, static.graph["user_item"],
                      augment(view_rng, items0, cfg.ssl_task, cfg.dropout_rate), cfg.n_layers)
    views.append(fuse(params, items, "item", cfg.fusion))
  return losses.distinct_rows_info_nce(views[0], views[1], ids, cfg.ssl_temp)


def main_loss(reps: Representations, batch: Batch, cfg) -> Array:
  u, pos = reps.users[batch.users], reps.items[batch.pos_items]
  if cfg.main_loss == "softmax":  # MMRec: cross-entropy over the batch's positives
    return jnp.mean(losses.info_nce_loss(u, pos, jnp.arange(u.shape[0]), None,
                                         cfg.temperature))
  return losses.bpr_loss(u, pos, reps.items[batch.neg_items])


def apply(params, model_state, static, batch: Batch, rng, config):
  del model_state
  cfg = config.slmrec
  reps, items0, item_branches = _forward(params, static, config)
  if cfg.ssl_task == "FAC":
    # The order comes from the config: pytree dicts come back key-sorted from transforms.
    order = fac_order(content_names(params), cfg.fac_order)
    ssl = fac_loss(params, item_branches, batch.pos_items, cfg.ssl_temp, order)
  else:
    ssl = view_loss(params, static, items0, batch.pos_items, rng, cfg)
  batch_size = batch.users.shape[0]
  loss = (main_loss(reps, batch, cfg) + cfg.ssl_alpha * ssl / batch_size
          + cfg.weight_decay * losses.weight_decay_penalty(params))
  return reps, loss
