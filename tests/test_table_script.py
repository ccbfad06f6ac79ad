"""fettle-experiments' tabulation (fettle_jax/tools/experiments.py): Delta Imp. and the
'Avg Delta Imp.' rows."""

from absl import flags
import pytest

from fettle_jax.tools import experiments


@pytest.fixture(name="table")
def fixture_table():
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments", "--seeds=0,1", "--backbones=a,b"])
  yield experiments
  flags.FLAGS.unparse_flags()


def metrics(value):
  return {"test": {m: value for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")},
          "valid": {m: value for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")},
          "best_epoch": 10}


def test_improvements_over_vanilla_and_their_average(table):
  cells = {("a", "vanilla"): [metrics(0.10), metrics(0.10)],
           ("a", "+BM3"): [metrics(0.09), metrics(0.09)],
           ("a", "+FETTLE"): [metrics(0.11), metrics(0.13)],   # mean 0.12: +20%
           ("b", "vanilla"): [metrics(0.20), metrics(0.20)],
           ("b", "+BM3"): [metrics(0.20), metrics(0.20)],
           ("b", "+FETTLE"): [metrics(0.22)]}                  # a seed missing: left out
  assert table.improvement(cells, "a", "+FETTLE")["recall@20"] == pytest.approx(20.0)
  assert table.improvement(cells, "a", "+BM3")["ndcg@10"] == pytest.approx(-10.0)
  assert table.improvement(cells, "b", "+FETTLE") is None
  rows = [(b, label, "-", cells[(b, label)]) for (b, label) in cells]
  lines = table.table_lines(rows, cells)
  assert "| +BM3 | 2 | -5.00% | -5.00% | -5.00% | -5.00% |" in lines  # mean of -10% and 0%
  assert "| +FETTLE | 1 | +20.00% | +20.00% | +20.00% | +20.00% |" in lines
  assert any(line.startswith("| a | +FETTLE | - | 2 | 0.1200 ± 0.0141 |") and
             line.endswith("| +20.00% |") for line in lines)
  csv = table.csv_lines(rows)
  assert csv[0].startswith("backbone,variant,fettle_setting,seeds,test_recall@10_mean")
  assert csv[3].startswith("a,+FETTLE,-,2,0.120000,0.014142,")


def test_configs_come_from_the_config_set_and_point_at_the_data_folder(table):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments", "--configs=baby", "--data=/some/mmrec/folder"])
  config = table.experiment_config("lightgcn")
  assert (config.data.path, config.data.prepare) == ("/some/mmrec/folder", "")
  assert config.model == "lightgcn"
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments"])
  config = table.experiment_config("bpr")  # ml100k: the embedded data set, prepared
  assert config.data.prepare == "ml100k"
  with pytest.raises(table.app.UsageError, match="no config configs/bpr_nowhere.py"):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["experiments", "--configs=nowhere"])
    table.experiment_config("bpr")


def test_given_settings_round_trip_the_tuning_tags_and_reject_bad_ones(table):
  tag = "b0.01_a0.0001_tf0.2_tc0.1"
  setting = table.parse_setting_tag(tag)
  assert setting == {"beta": 0.01, "alpha": 1e-4, "temperature_feedback": 0.2,
                     "temperature_cluster": 0.1}
  assert table.setting_tag(setting) == tag
  assert table.parse_setting_tag("b1e-05_a0.001_tf0.1_tc0.05")["beta"] == 1e-5
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments", "--backbones=a,b", f"--settings=a:{tag}"])
  assert table.given_settings() == {"a": setting}
  for bad in ("a", "a:b0.01_x3_tf0.2_tc0.1", "a:b0.01_a0.001"):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["experiments", f"--settings={bad}"])
    with pytest.raises(Exception, match="--settings"):
      table.given_settings()


def test_variants_filter_the_rows_and_bad_flags_fail_at_start(table):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments", "--backbones=bpr,freedom", "--ablation=freedom",
               "--variants=vanilla,+CLA"])
  assert [v[0] for v in table.table_variants("bpr")] == ["vanilla"]
  assert [v[0] for v in table.table_variants("freedom")] == ["vanilla", "+CLA"]
  assert table.check_flags() == {}
  for bad, message in (("--variants=+XYZ", "--variants"),
                       ("--settings=lightgcn:b0.01_a0.0001_tf0.2_tc0.1", "not in --backbones"),
                       ("--tune_coordinates=gamma", "--tune_coordinates")):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["experiments", "--backbones=bpr", bad])
    with pytest.raises(Exception, match=message):
      table.check_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["experiments", "--backbones=bpr,freedom"])
  assert len(table.table_variants("freedom")) == 7 and len(table.table_variants("bpr")) == 3
