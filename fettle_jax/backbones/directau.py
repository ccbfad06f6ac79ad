"""DirectAU (Wang et al., KDD'22): learn CF representations by directly optimizing their
alignment and uniformity on the hypersphere, with no negative sampling.

L = l_align + gamma * l_uniform over one batch of B interacting (user, item) pairs, on the
L2-normalized encoder outputs u~, i~ (their Sec. 4):
  l_align   = mean_b ||u~_b - i~_b||^2                               (Eq. 5, alpha = 2);
  l_uniform = (log mean_{a<b} e^{-2 ||u~_a - u~_b||^2}
               + log mean_{a<b} e^{-2 ||i~_a - i~_b||^2}) / 2        (Eq. 6, t = 2).
The batch's negative items (the train loop samples them for every backbone) are not read.
Encoder (`encoder`): 'mf', the ID tables themselves, or 'lightgcn', the mean of LightGCN
layers on the normalized user-item graph (He et al. 2020, Eq. 3-4), as the paper pairs
DirectAU with both. Ranking scores are inner products of the unnormalized encoder outputs,
as the authors' code ranks.

Duplicates: a batch is B rows drawn from the interactions, so a user (item) with several
interactions can fill several rows. Both terms average over rows, and uniformity over all
row pairs a < b (a duplicate pair adds e^0 = 1), exactly as the authors' code (torch.pdist
over the batch rows); `losses.alignment_loss` / `losses.uniformity_loss` compute precisely
that, so they are reused unchanged. (The paper's Appendix measurement of uniformity on the
whole data weights distinct-ID pairs by frequency and drops same-ID pairs; that is an
evaluation metric, not the training loss.)

Weight decay: the authors train with torch Adam(weight_decay=1e-6), which adds wd * theta to
the gradient of every parameter (every table row, since the tables have dense gradients).
The shared optimizer here is plain Adam, so the same gradient comes from the loss term
wd / 2 * ||theta||^2 over the whole tables (`losses.weight_decay_penalty`).
"""

import ml_collections

from fettle_jax import losses
from fettle_jax.backbones import lightgcn
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, Representations

ENCODERS = ("mf", "lightgcn")


def default_config() -> ml_collections.ConfigDict:
  """`config.directau`; the values the authors give for Amazon Beauty."""
  return ml_collections.ConfigDict({
      # str: 'mf' (ID tables) | 'lightgcn' (LightGCN propagation). Authors' README command
      # for Beauty and their DirectAU.yaml: MF.
      "encoder": "mf",
      # float: weight of the uniformity term. Authors' README for Beauty: 0.5 (their
      # DirectAU.yaml default 1; tuning grid directau.hyper {0.01, ..., 0.5, 1, 2, 5, 10}).
      "gamma": 0.5,
      # int: propagation layers K with encoder='lightgcn'. The authors leave it unset
      # (README: "None"); 2 as RecBole's LightGCN.yaml and config.lightgcn.n_layers.
      "n_layers": 2,
      # float: torch-Adam-style weight decay on every parameter, as wd / 2 * ||theta||^2.
      # Authors' README for Beauty and their overall.yaml: 1e-6 (grid {0, 1e-8, 1e-6, 1e-4}).
      "weight_decay": 1e-6,
  })


def check_config(cfg) -> None:
  """One-line errors for `config.directau` (the train loop calls it before loading data)."""
  if cfg.encoder not in ENCODERS:
    raise ConfigError(f"directau.encoder must be one of {ENCODERS}, got {cfg.encoder!r}")
  if cfg.gamma < 0 or cfg.weight_decay < 0:
    raise ConfigError(f"directau.gamma and directau.weight_decay must not be negative, got "
                      f"{cfg.gamma} and {cfg.weight_decay}")
  if cfg.n_layers < 0:
    raise ConfigError(f"directau.n_layers must not be negative, got {cfg.n_layers}")


def build_graph(train_pairs, n_users, n_items, features, config):
  if config.directau.encoder != "lightgcn":  # MF needs no graph on device
    return {}
  return lightgcn.build_graph(train_pairs, n_users, n_items, features, config)


init = lightgcn.init


def represent(params, model_state, static, config) -> Representations:
  """The encoder's outputs f(u), f(i), unnormalized (scores are their inner products)."""
  del model_state
  cfg = config.directau
  users, items = params["user_embedding"], params["item_embedding"]
  if cfg.encoder == "mf":
    return Representations(users, items, {})
  return lightgcn.layer_mean_representations(params, static.graph["user_item"], cfg.n_layers)


def directau_loss(user_vecs, item_vecs, gamma: float):
  """l_align + gamma * l_uniform (Eq. 5-6) on the batch's B interacting pairs (rows)."""
  uniform = (losses.uniformity_loss(user_vecs, t=2.0)
             + losses.uniformity_loss(item_vecs, t=2.0)) / 2.0
  return losses.alignment_loss(user_vecs, item_vecs, alpha=2.0) + gamma * uniform


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  cfg = config.directau
  reps = represent(params, model_state, static, config)
  loss = directau_loss(reps.users[batch.users], reps.items[batch.pos_items], cfg.gamma)
  return reps, loss + cfg.weight_decay * losses.weight_decay_penalty(params)
