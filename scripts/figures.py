"""The paper's figures: `python scripts/figures.py fig1|fig4|fig5|fig6|fig8 [flags]` runs the
`fettle-figures` console script (fettle_jax/tools/figures.py; see its --help)."""

from fettle_jax.tools import figures

if __name__ == "__main__":
  figures.cli()
