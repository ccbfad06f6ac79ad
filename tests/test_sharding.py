"""The mesh config, the partition rules and padded placement (one device; the multi-device
behaviour is tested in tests/multidevice, in its own process)."""

import ml_collections
import numpy as np
import pytest

from fettle_jax import sharding
from fettle_jax.errors import ConfigError


def mesh_config(data, model):
  return ml_collections.ConfigDict({"data": data, "model": model})


@pytest.mark.parametrize("data,model,n,expected", [
    (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (1, 1, 8, (1, 1)),
    (-1, 1, 1, (1, 1))])
def test_mesh_shape_resolves_minus_one(data, model, n, expected):
  assert sharding.mesh_shape(mesh_config(data, model), n) == expected


@pytest.mark.parametrize("data,model,n,message", [
    (-1, -1, 8, "both"), (0, 1, 8, "positive"), (-1, 3, 8, "groups of 3"),
    (4, 4, 8, "needs 16 devices"), (1, -2, 8, "positive")])
def test_bad_mesh_is_a_one_line_config_error(data, model, n, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(mesh_config(data, model), n)


def test_rules_match_parameter_and_adam_paths():
  rules = sharding.STATE_RULES
  P = sharding.P
  assert sharding.spec_for("params/backbone/user_embedding", 2, rules) == P("model", None)
  assert sharding.spec_for("opt_state/0/mu/backbone/item_embedding", 2, rules) == P("model", None)
  assert sharding.spec_for("params/alignment/codebook_user", 2, rules) == P(None, "model")
  assert sharding.spec_for("params/alignment/projectors/image/kernel", 2, rules) == P()
  assert sharding.spec_for("opt_state/0/count", 0, rules) == P()
  assert sharding.spec_for("features/text", 2, sharding.STATIC_RULES) == P("model", None)


def test_one_device_placement_is_unpadded_and_round_trips():
  mesh = sharding.make_mesh(mesh_config(1, 1))
  tree = {"params": {"user_embedding": np.arange(21.0, dtype=np.float32).reshape(7, 3)},
          "count": np.int32(3)}
  placement = sharding.placement(tree, sharding.STATE_RULES, mesh)
  assert not placement.padded
  placed = placement.place(tree)
  np.testing.assert_array_equal(placed["params"]["user_embedding"], tree["params"]["user_embedding"])
  shardings, to_storage, from_storage = placement.storage()
  assert to_storage is None and from_storage is None


def test_padded_and_shard_shapes_round_sharded_dimensions_up():
  P = sharding.P
  axes = {"data": 2, "model": 4}
  assert sharding.padded_shape((1682, 64), P("model", None), axes) == (1684, 64)
  assert sharding.shard_shape((1682, 64), P("model", None), axes) == (421, 64)
  assert sharding.shard_shape((64, 10240), P(None, "model"), axes) == (64, 2560)
  assert sharding.shard_shape((2048, 20480), P("data", "model"), axes) == (1024, 5120)
  assert sharding.shard_shape((7, 3), P(), axes) == (7, 3)
  assert sharding.padded_shape((1682, 64), P("model", None), {"data": 1, "model": 1}) == (
      1682, 64)


def test_unreachable_coordinator_is_one_line_error(tmp_path):
  import os, socket, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), f"--workdir={tmp_path}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
       "--distributed_timeout=2", "--compilation_cache=none"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith(f"error: cannot reach the coordinator 127.0.0.1:{port} within 2 s")
  assert not any(l.startswith("Traceback") for l in lines)
