"""Module structure: no import cycles; config files import without JAX."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("fettle_jax", "data_pipeline", "configs")


def module_name(path: str) -> str:
  name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return name[: -len(".__init__")] if name.endswith(".__init__") else name


def project_modules():
  modules = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for file in files:
        if file.endswith(".py"):
          path = os.path.join(folder, file)
          modules[module_name(path)] = path
  return modules


def top_level_imports(path: str, modules) -> set:
  """Project modules imported at module level (imports inside functions run later)."""
  imported = set()
  for node in ast.parse(open(path).read()).body:
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    imported |= {n for n in names if n in modules}
  return imported


def test_no_import_cycles_among_project_modules():
  modules = project_modules()
  graph = {m: top_level_imports(p, modules) - {m} for m, p in modules.items()}
  for module in graph:  # a package imports its parents implicitly: count those too
    parts = module.split(".")
    graph[module] |= {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules)
  visiting, done = set(), set()

  def visit(module, trail):
    if module in done:
      return
    assert module not in visiting, "import cycle: " + " -> ".join(trail + [module])
    visiting.add(module)
    for dependency in sorted(graph[module]):
      visit(dependency, trail + [module])
    visiting.discard(module)
    done.add(module)

  assert len(graph) > 20
  for module in sorted(graph):
    visit(module, [])


def test_importing_configs_does_not_import_jax():
  configs = sorted(m for m in project_modules() if m.startswith("configs."))
  code = ("import importlib, sys\n"
          f"for name in {configs!r}:\n"
          "  importlib.import_module(name)\n"
          "print('jax' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "False", out.stderr
