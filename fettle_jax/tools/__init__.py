"""The command-line tools installed as console scripts (setup.cfg's entry points) that are
not library modules: the paper's tables (experiments) and figures."""
