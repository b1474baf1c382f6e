"""The command line: clean import, reproducible synth, validate, inspect, benchmark script."""
import filecmp
import os
import subprocess
import sys

from conftest import REPO, raw_records, write_records
from trainer.data import records

ENV = dict(os.environ, PYTHONPATH=REPO)


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_import_prints_no_traceback():
    # Importing the package and the whole stack through it: no traceback, no ImportError.
    r = run("-c", "import trainer, tensorflow, tensorflow_recommenders, faiss, pyarrow, "
                  "apache_beam, google_crc32c, "
                  "tensorflow_datasets, official.vision.modeling.backbones.resnet, "
                  "tensorflow_serving.apis.prediction_log_pb2; "
                  "import tensorflow as tf; assert 'tf_keras' in tf.keras.__name__")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr, r.stderr


def test_importing_the_package_leaves_devices_configurable():
    # No TensorFlow op may run at import: users configure devices and strategies afterwards.
    r = run("-c", "import trainer.task, trainer.data.pipeline, trainer.data.augment, "
                  "trainer.data.validate, trainer.synth.marketplace; import tensorflow as tf; "
                  "cpu = tf.config.list_physical_devices('CPU')[0]; "
                  "tf.config.set_logical_device_configuration(cpu, "
                  "[tf.config.LogicalDeviceConfiguration()] * 2); "
                  "assert len(tf.config.list_logical_devices('CPU')) == 2")
    assert r.returncode == 0, r.stderr


def test_synth_twice_gives_identical_files(tmp_path):
    for name in ("a", "b"):
        r = run("-m", "trainer.task", "--stage=synth", "--world=tiny", "--seed=0",
                f"--data_dir={tmp_path / name}")
        assert r.returncode == 0, r.stderr
    assert "| catalog | all |" in r.stdout
    cmp = filecmp.dircmp(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in cmp.subdirs.values():
        assert not sub.diff_files and not sub.left_only and not sub.right_only


def test_validate_reports_bad_records_and_fails(tiny_world, tmp_path):
    recs = raw_records(records.default_pattern(tiny_world, "catalog"))[:5]
    recs[2] = b"garbage"
    path = write_records(str(tmp_path / "bad.tfrecord"), recs)
    r = run("-m", "trainer.task", "--stage=validate", "--kind=catalog", f"--file_pattern={path}",
            "--image_size=32")
    assert r.returncode == 1
    assert f"BAD {path}: record 2: feature '<record>'" in r.stdout
    r = run("-m", "trainer.task", "--stage=validate", f"--data_dir={tiny_world}")
    assert r.returncode == 0, r.stdout + r.stderr
    # every split in the layout: train and test, and the early / late copies of the train days
    assert "ctr: 28000 records in 10 files, 0 bad" in r.stdout


def test_inspect_runs_on_the_world(tiny_world, tmp_path):
    r = run("-m", "trainer.task", "--stage=inspect", f"--data_dir={tiny_world}",
            f"--model_dir={tmp_path}", "--batch_size=16")
    assert r.returncode == 0, r.stderr
    for kind in ("catalog", "queries", "search_sessions", "pageviews", "ctr", "judgments"):
        assert f"| {kind} |" in r.stdout
    assert "view_1 [16, 32, 32, 3]" in r.stdout
    assert os.path.getsize(tmp_path / "preview.png") > 1000


def test_bench_input_prints_the_three_rates_and_ratio(tiny_world):
    r = run("scripts/bench_input.py", f"--data_dir={tiny_world}", "--seconds=0.5",
            "--batch_size=32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout
    for label in ("1. raw record reading:", "2. read + parse + decode:",
                  "3. read + parse + decode + augment:", "ratio 3 / 1:"):
        assert label in lines
    rates = [float(line.split(":")[1].split()[0]) for line in lines.splitlines()
             if line[:2] in ("1.", "2.", "3.")]
    assert len(rates) == 3 and all(r > 0 for r in rates)


def test_a_named_experiment_resolves_to_its_stage_and_overrides(tmp_path):
    import yaml
    r = run("-m", "trainer.task", "--experiment=s1s2", f"--runs_dir={tmp_path}", "--print_config")
    assert r.returncode == 0, r.stderr
    tree = yaml.safe_load(r.stdout)
    assert tree["stage"] == "finetune" and tree["model_dir"] == str(tmp_path / "s1s2")
    assert tree["encoder"]["init_checkpoint"] == str(tmp_path / "s1")
    r = run("-m", "trainer.task", "--experiment=ctr/courier_cluster_id",
            "--experiment_dir=courier=X", "--set=train.steps=7", "--print_config")
    tree = yaml.safe_load(r.stdout)
    assert tree["images"]["model_dir"] == "X" and tree["train"]["steps"] == 7
    assert tree["ctr"]["image_feature_mode"] == "cluster_id" and tree["stage"] == "ctr"
    r = run("-m", "trainer.task", "--experiment=ctr/s1s2_dd", "--print_config")
    assert r.returncode == 2 and "did you mean ctr/s1s2_d" in r.stderr


def test_every_experiment_command_line_builds_its_config():
    """What the scripts run: each registered experiment's command line, as experiments.command
    writes it, gives a config tree with its stage and its overrides."""
    from absl import flags

    from trainer import configs, experiments, task
    dirs = {name: f"/runs/{name}" for name in experiments.REGISTRY}
    for name, exp in experiments.REGISTRY.items():
        argv = experiments.command(exp, "/data", f"/runs/{name}", dirs, seed=3)
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["trainer.task", *argv[3:]])
        cfg = task.build_config()
        assert cfg.stage == exp.stage and cfg.model_dir == f"/runs/{name}" and cfg.seed == 3
        for path, value in experiments.resolved(exp, dirs):
            assert configs.to_dict(cfg) == configs.to_dict(configs.override(cfg, path, value)), \
                (name, path)
    flags.FLAGS.unparse_flags()


def test_a_run_counts_as_trained_only_at_its_configured_steps(tmp_path):
    """The repro scripts skip trained encoders; an interrupted run (checkpoints short of its
    steps) is rerun, which resumes it."""
    import json

    from trainer import experiments
    d = tmp_path / "s1"
    assert not experiments.trained(str(d))
    os.makedirs(d / "ckpt")
    (d / "config.json").write_text(json.dumps({"train": {"steps": 600}}))
    (d / "ckpt" / "ckpt-450.index").write_bytes(b"")
    assert not experiments.trained(str(d))
    (d / "ckpt" / "ckpt-600.index").write_bytes(b"")
    assert experiments.trained(str(d))
