"""The experiment config of a command line: found, loaded, overridden and checked before a
run folder, lock or data set exists, so that every mistake in it is one `ConfigError` line
(run.py prints `error: ...` and exits 1), never a traceback or a half-made run folder.

  --config=PATH | NAME   a config file: PATH as given (from the current directory, then
                         from the repository root), or NAME for configs/NAME.py
  --config.F.G=VALUE     sets field F.G, VALUE read as the field's type: int, float (finite),
                         bool (true/false/1/0, or a bare --config.F.G / --noconfig.F.G), str,
                         tuple (`5,10,20` or `(5, 10, 20)`; `None` where the default is None)

An explicit `--config.data.path` wins over the config's built-in data set: it clears
`data.prepare` (giving a non-empty `--config.data.prepare` as well is refused), and the
folder must hold a data set before anything else happens.

This module only reads: it touches no device and creates no file or folder.
"""

import ast
import difflib
import importlib.util
import math
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

from absl import flags
import ml_collections

from data_pipeline.errors import DataError
from fettle_jax.alignment import ALIGNMENTS
from fettle_jax.errors import ConfigError

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPOSITORY, "configs")
FLAG = "config"

class Override(NamedTuple):
  """One `--config.FIELD[=TEXT]` argument (TEXT None: a bare flag; negated: --noconfig.F)."""
  argument: str
  field: str
  text: Optional[str]
  negated: bool = False


class CommandLine(NamedTuple):
  config_spec: Optional[str]  # the --config value, None if not given
  overrides: List[Override]
  rest: List[str]  # every other argument, for absl


def split_arguments(argv: Sequence[str]) -> CommandLine:
  """Separates `--config[=| ]X` and the `--config.F...` overrides from the other flags
  (absl parses those). Arguments after a bare `--` are left alone."""
  spec, overrides, rest = None, [], [argv[0]] if argv else []
  arguments = list(argv[1:])
  index = 0
  while index < len(arguments):
    argument = arguments[index]
    index += 1
    if argument == "--":
      rest.extend(arguments[index - 1:])
      break
    name, has_value, text = argument.lstrip("-").partition("=")
    if not argument.startswith("-") or argument.startswith("---"):
      rest.append(argument)
    elif name == FLAG:
      if not has_value:  # `--config PATH`
        if index >= len(arguments):
          raise ConfigError("--config needs a value: --config=PATH or --config=NAME")
        text = arguments[index]
        index += 1
      spec = text
      rest.append(f"--{FLAG}={text}")  # absl's copy (--help, FLAGS.config): the same value
    elif name.startswith(FLAG + ".") or name.startswith("no" + FLAG + "."):
      negated = name.startswith("no")
      field = name.split(".", 1)[1]
      overrides.append(Override(argument, field, text if has_value else None, negated))
    else:
      rest.append(argument)
  return CommandLine(spec, overrides, rest)


def config_candidates(spec: str, cwd: Optional[str] = None) -> List[str]:
  """Where `--config=spec` is looked for, in order: as given (from the current directory),
  from the repository root, and as a name in configs/ (with and without `.py`)."""
  cwd = cwd or os.getcwd()
  candidates = [os.path.join(cwd, os.path.expanduser(spec))]
  if not os.path.isabs(os.path.expanduser(spec)):
    candidates.append(os.path.join(REPOSITORY, spec))
    candidates.append(os.path.join(CONFIGS, spec))
    if not spec.endswith(".py"):
      candidates.append(os.path.join(CONFIGS, spec + ".py"))
  unique = []
  for path in map(os.path.normpath, candidates):
    if path not in unique:
      unique.append(path)
  return unique


def config_names() -> List[str]:
  """The experiment files in configs/ by name (base.py holds only shared defaults)."""
  names = []
  for file in sorted(os.listdir(CONFIGS)):
    if file.endswith(".py") and not file.startswith("_") and file != "base.py":
      names.append(file[:-3])
  return names


def find_config_file(spec: str, cwd: Optional[str] = None) -> str:
  """The config file `spec` names (see `config_candidates`), or a ConfigError saying where
  it looked and which names exist."""
  if not spec or not spec.strip():
    raise ConfigError("--config is empty: pass --config=PATH or --config=NAME "
                      f"(names: {', '.join(config_names())})")
  candidates = config_candidates(spec, cwd)
  for path in candidates:
    if os.path.isfile(path):
      return path
  stem = os.path.splitext(os.path.basename(spec))[0]
  closest = difflib.get_close_matches(stem, config_names(), n=3)
  hint = (f"; did you mean {' or '.join(closest)}?" if closest
          else f"; names in {CONFIGS}: {', '.join(config_names())}")
  raise ConfigError(f"config file {spec!r} not found; looked for {', '.join(candidates)}{hint}")


def _error_line(path: str, error: BaseException) -> str:
  """Where in the config file a load failed: its line number, if the error passed there."""
  line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
  traceback = error.__traceback__
  while traceback is not None:
    if os.path.abspath(traceback.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = traceback.tb_lineno
    traceback = traceback.tb_next
  return f"{path}" + (f", line {line}" if line else "")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the file at `path`, locked (no new fields, as config_flags does)."""
  name = "fettle_jax_config_" + "".join(c if c.isalnum() else "_" for c in path)
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"{path}: not a config file (it defines no get_config())")
    config = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a broken config file: one line
    message = str(e).splitlines()[0] if str(e) else ""
    raise ConfigError(f"{_error_line(path, e)}: cannot load the config "
                      f"({type(e).__name__}: {message})") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, "
                      "not a ConfigDict")
  config.lock()
  return config


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """Every field and section of `config` as a dotted path."""
  paths = []
  for name in config.keys():
    path = prefix + name
    paths.append(path)
    if isinstance(config[name], ml_collections.ConfigDict):
      paths.extend(field_paths(config[name], path + "."))
  return paths


def closest_fields(config: ml_collections.ConfigDict, field: str) -> List[str]:
  """The valid dotted paths most like `field`: by the whole path, then by its last part."""
  paths = field_paths(config)
  close = difflib.get_close_matches(field, paths, n=3, cutoff=0.8)
  last = field.rsplit(".", 1)[-1]
  by_last = {path.rsplit(".", 1)[-1]: path for path in reversed(paths)}
  for match in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.75):
    same_last = [p for p in paths if p.rsplit(".", 1)[-1] == match]
    close.extend(p for p in same_last if p not in close)
  return close[:4]


def _unknown_field(config, override: Override, section: str, name: str) -> ConfigError:
  where = f"config.{section}" if section else "the config"
  closest = closest_fields(config, override.field)
  if closest:
    hint = "closest: " + ", ".join(f"--config.{p}" for p in closest)
  else:
    node = config
    for part in filter(None, section.split(".")):
      node = node[part]
    hint = f"its fields: {', '.join(sorted(node.keys()))}"
  return ConfigError(f"--config.{override.field}: {where} has no field {name!r}; {hint}")


def _element_type(default) -> type:
  """The element type a tuple field holds: its default's, else str (names)."""
  if isinstance(default, tuple) and default:
    return type(default[0])
  return str


def _parse_tuple(text: str, default, nullable: bool):
  if nullable and text.strip() in ("None", "none"):
    return None
  element_type = _element_type(default)
  body = text.strip()
  if body[:1] + body[-1:] in ("()", "[]"):
    body = body[1:-1]
  pieces = [piece.strip() for piece in body.split(",")]
  if pieces and not pieces[-1]:  # a trailing comma: `(5,)`
    pieces = pieces[:-1]
  if any(not piece for piece in pieces):
    raise ValueError("an empty element")
  values = []
  for piece in pieces:
    if element_type is str:
      if len(piece) >= 2 and piece[0] == piece[-1] and piece[0] in "'\"":
        piece = piece[1:-1]
      values.append(piece)
    elif element_type is int:
      values.append(flags.IntegerParser().parse(piece))
    elif element_type is float:
      values.append(_finite(flags.FloatParser().parse(piece)))
    else:
      values.append(ast.literal_eval(piece))
  return tuple(values)


def _finite(value: float) -> float:
  if not math.isfinite(value):
    raise ValueError(f"{value} is not a finite number")
  return value


def _type_name(field_type, default) -> str:
  if field_type is tuple:
    return f"tuple of {_element_type(default).__name__}"
  return getattr(field_type, "__name__", str(field_type))


def parse_value(override: Override, field_type, default, nullable: bool):
  """The override's text as a value of `field_type` (ValueError if it is not one)."""
  if field_type is bool:
    if override.text is None:
      return not override.negated
    if override.negated:
      raise ValueError("--noconfig.F takes no value")
    return flags.BooleanParser().parse(override.text)
  if override.negated:
    raise ValueError("only a true/false field can be negated")
  if override.text is None:
    raise ValueError(f"a value is needed: --config.{override.field}=VALUE")
  if field_type is int:
    return flags.IntegerParser().parse(override.text)
  if field_type is float:
    return _finite(flags.FloatParser().parse(override.text))
  if field_type is str:
    return override.text
  if field_type is tuple:
    return _parse_tuple(override.text, default, nullable)
  raise ValueError(f"a field of type {_type_name(field_type, default)} cannot be set from "
                   "the command line")


def apply_override(config: ml_collections.ConfigDict, override: Override) -> None:
  """Sets one field, or raises a ConfigError naming it (unknown field, wrong type, section)."""
  parts = override.field.split(".")
  if not all(part.isidentifier() for part in parts):
    raise ConfigError(f"{override.argument!r}: not a field name; fields look like "
                      "--config.fettle.alpha=VALUE")
  node, section = config, ""
  for part in parts[:-1]:
    if part not in node:
      raise _unknown_field(config, override, section, part)
    if not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"--config.{override.field}: config.{section}{part} is a value, not "
                        "a section with fields")
    node, section = node[part], f"{section}{part}."
  name = parts[-1]
  section = section.rstrip(".")
  if name not in node:
    raise _unknown_field(config, override, section, name)
  default = node[name]
  if isinstance(default, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{override.field} is a section; set its fields, e.g. "
                      f"--config.{override.field}.{sorted(default.keys())[0]}=VALUE")
  field_type = node.get_type(name)
  # A typed field that may be None (a FieldReference, e.g. data.modalities) takes `None`.
  reference = node._fields.get(name)  # pylint: disable=protected-access
  nullable = isinstance(reference, ml_collections.FieldReference)
  try:
    value = parse_value(override, field_type, default, nullable)
    node[name] = value
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{override.argument}: expected {_type_name(field_type, default)} "
                      f"({e})") from None


def check_names(config: ml_collections.ConfigDict) -> None:
  """The fields that name a module or a device count: refused with the valid values, before
  any module is imported or device touched."""
  from configs import base  # pylint: disable=g-import-not-at-top
  backbones = base.backbone_names()
  if config.model not in backbones:
    raise ConfigError(f"config.model: unknown backbone {config.model!r}; valid: "
                      f"{', '.join(backbones)}")
  if config.alignment not in ALIGNMENTS:
    raise ConfigError(f"config.alignment: unknown alignment {config.alignment!r}; valid: "
                      f"{', '.join(ALIGNMENTS)}")
  for axis in ("data", "model"):
    size = config.mesh[axis]
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size}: valid values are a positive device "
                        "count, or -1 for every device the other axis leaves")
  if config.mesh.data == -1 and config.mesh.model == -1:
    raise ConfigError("config.mesh.data and config.mesh.model cannot both be -1")


def unread_overrides(config: ml_collections.ConfigDict,
                     overrides: Sequence[Override]) -> List[str]:
  """A note per override of a section this run does not read (another backbone's, an
  alignment other than config.alignment): valid, but without effect, which is worth
  saying (e.g. FETTLE's fields given while config.alignment is still 'none')."""
  from configs import base  # pylint: disable=g-import-not-at-top
  backbones = base.backbone_names()
  notes = []
  for override in overrides:
    section = override.field.split(".")[0]
    if section in backbones and section != config.model:
      why = f"config.model is {config.model!r}"
    elif section in ALIGNMENTS and section != config.alignment:
      why = f"config.alignment is {config.alignment!r}"
    elif section == "fettle_shapes" and config.alignment != "fettle":
      why = f"config.alignment is {config.alignment!r}"
    else:
      continue
    notes.append(f"note: {printable(override.argument)} has no effect: {why}")
  return notes


def resolve_data_source(config: ml_collections.ConfigDict, overrides: Sequence[Override]):
  """An explicit --config.data.path wins: it clears the config's `data.prepare`; with a
  non-empty --config.data.prepare as well it is ambiguous, and refused."""
  given = {override.field for override in overrides}
  if "data.path" not in given:
    return
  if "data.prepare" in given and config.data.prepare:
    raise ConfigError(f"--config.data.path={config.data.path} and --config.data.prepare="
                      f"{config.data.prepare} both name the data; pass one of them")
  config.data.prepare = ""


def check_data_folder(config: ml_collections.ConfigDict, cwd: Optional[str] = None) -> None:
  """Without a built-in data set to prepare, the data folder must hold one (its format is
  detected from its file names; the files are read later)."""
  if not config.data.prepare:
    from data_pipeline import dataset  # pylint: disable=g-import-not-at-top
    # Absolute, so that the message says where it looked.
    dataset.detect_format(os.path.join(cwd or os.getcwd(), config.data.path))


def config_from_command_line(argv: Sequence[str], default_spec: str,
                             cwd: Optional[str] = None
                             ) -> Tuple[ml_collections.ConfigDict, str, List[str]]:
  """(config, config file name without `.py`, the arguments absl parses): the file found,
  every override applied in order (the last of a field wins), the names checked, the data
  source settled. Raises ConfigError (or DataError for a folder without data)."""
  try:
    command = split_arguments(argv)
    path = find_config_file(command.config_spec or default_spec, cwd)
    config = load_config_file(path)
    for override in command.overrides:
      apply_override(config, override)
    resolve_data_source(config, command.overrides)
    check_names(config)
    check_data_folder(config, cwd)
  except (ConfigError, DataError) as e:  # a value's line break or tab stays on the line
    raise type(e)(printable(str(e))) from None
  return config, os.path.splitext(os.path.basename(path))[0], command.rest


def printable(text: str) -> str:
  """`text` with every unprintable character escaped (a newline as \\n): one line."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
