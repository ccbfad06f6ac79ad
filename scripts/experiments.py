"""The paper's Table 2 and Table 3: `python scripts/experiments.py [flags]` runs the
`fettle-experiments` console script (fettle_jax/tools/experiments.py; see its --help)."""

from fettle_jax.tools import experiments

if __name__ == "__main__":
  experiments.cli()
