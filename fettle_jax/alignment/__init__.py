"""Alignment plug-ins: each module exposes `init(rng, data_info, config) -> params` and
`loss(params, reps, features, batch, rng, config) -> (weighted_loss, aux)`."""

import importlib
from types import ModuleType
from fettle_jax.errors import ConfigError

ALIGNMENTS = ("fettle", "bm3", "none")


def get_alignment(name: str) -> ModuleType:
  """The alignment module called `name` ('fettle', 'bm3' or 'none')."""
  if name not in ALIGNMENTS:
    raise ConfigError(f"unknown alignment {name!r}; expected one of {ALIGNMENTS}")
  return importlib.import_module(f"{__name__}.{name}")
