"""scripts/scaling_table.py: shape-only memory predictions against real states and the rules."""

import json
import math

import jax
import numpy as np

from fettle_jax import sharding
from fettle_jax import train
from tests.conftest import load_script, tiny_config

scaling_table = load_script("scaling_table")


def _freedom_fettle(path):
  config = tiny_config(path, model="freedom", alignment="fettle")
  config.mesh.data, config.mesh.model = 1, 1
  return config


def test_single_device_prediction_equals_real_state_bytes(tiny_mmrec):
  config = _freedom_fettle(tiny_mmrec)
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  real = sum(x.nbytes for x in jax.tree.leaves(run.state))
  dims = {k: v.shape[1] for k, v in data.features.items()}
  predicted = scaling_table.predict(config, data.n_users, data.n_items, len(data.train), dims,
                                    data=1, model=1)
  assert predicted["params"] + predicted["opt_state"] == real
  # The one device holds all of it, as measured from the placed arrays' shards.
  assert sharding.per_device_bytes(run.state) == real
  # Static inputs: the counts-based estimate is at least the real size (kNN edges are an
  # upper bound; the user-item graph and edge lists are exact).
  assert predicted["static"] >= sum(x.nbytes for x in jax.tree.leaves(run.static))


def test_model_axis_shards_id_tables_by_rows(tiny_mmrec):
  config = _freedom_fettle(tiny_mmrec)
  n_users, n_items, n_train, dims = 41, 30, 250, {"image": 12, "text": 6}  # 41, 30: uneven
  size, model = config.embedding_size, 4
  state = scaling_table.state_shapes(config, scaling_table.DataInfo(n_users, n_items, dims))
  axis_sizes = {sharding.DATA: 1, sharding.MODEL: model}
  for name, n in (("user_embedding", n_users), ("item_embedding", n_items)):
    table = {"backbone": {name: state.params["backbone"][name]}}
    assert state.params["backbone"][name].shape == (n, size)
    assert scaling_table.tree_bytes(table, sharding.STATE_RULES, axis_sizes) == (
        math.ceil(n / model) * size * 4)
  # The whole column: ID tables by rows, codebooks [L, P] along P, the rest replicated.
  one = scaling_table.predict(config, n_users, n_items, n_train, dims, data=1, model=1)
  split = scaling_table.predict(config, n_users, n_items, n_train, dims, data=1, model=model)
  saved = sum(n * size * 4 - math.ceil(n / model) * size * 4 for n in (n_users, n_items))
  saved += sum(size * p * 4 - size * math.ceil(p / model) * 4 for p in (
      config.fettle.prototypes_item, config.fettle.prototypes_user))
  assert one["params"] - split["params"] == saved
  assert one["opt_state"] - split["opt_state"] == 2 * saved  # mu and nu follow the params


def test_shard_bytes_pads_like_the_placement():
  sizes = {sharding.DATA: 2, sharding.MODEL: 4}
  P = sharding.P
  assert scaling_table.shard_bytes((10, 3), np.float32, P(), sizes) == 120
  assert scaling_table.shard_bytes((10, 3), np.float32, P("model", None), sizes) == 3 * 3 * 4
  assert scaling_table.shard_bytes((10, 3), np.int32, P("data", "model"), sizes) == 5 * 1 * 4
  assert scaling_table.shard_bytes((7, 9), np.float32, P(("data", "model"), None),
                                   sizes) == 1 * 9 * 4


def test_table_rows_and_json(tmp_path, monkeypatch):
  monkeypatch.setattr(scaling_table, "MESHES", ((1, 1), (8, 1), (1, 8)))  # fewer rows: speed
  out = tmp_path / "table.json"
  assert scaling_table.main(["scaling_table.py", f"--json={out}"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == 4 * 3
  assert {r["dataset"] for r in rows} == {"Baby", "Sports", "Clothing", "Baby x100"}
  for row in rows:
    assert row["total"] == (row["params"] + row["opt_state"] + row["static"]
                            + max(row["step_activation"], row["eval_scores"]))
  baby = {(r["data"], r["model"]): r for r in rows if r["dataset"] == "Baby"}
  assert baby[(1, 8)]["params"] < baby[(8, 1)]["params"] == baby[(1, 1)]["params"]
