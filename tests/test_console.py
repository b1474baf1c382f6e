"""What a command prints: its own progress and results, warnings about the run and errors by
default; the libraries' logs with --verbosity (trainer.console)."""
import logging
import os
import subprocess
import sys

import pytest

from conftest import REPO
from trainer import console

# What the libraries print when nothing quietens them (seen on TF 2.17 and 2.20, Beam 2.77).
NOISE = ("cuInit", "Unable to register", "cudart_stub", "cpu_feature_guard", "oneDNN custom",
         "absl::InitializeLog", "np.float32(", "train | step", "GCSFileSystem", "apitools",
         "Skipping full serialization", "contains input name(s)", "I0000 ", "W1206")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP_")}


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, r.stderr


def test_a_short_ctr_run_fits_on_one_screen(tiny_world, encoder_dir, tmp_path):
    out, err = run("-m", "trainer.task", "--stage=ctr", f"--data_dir={tiny_world}",
                   f"--model_dir={tmp_path / 'ctr'}", "--image_features=s1",
                   f"--image_model_dir={encoder_dir}", "--train_steps=10", "--batch_size=64",
                   "--log_interval=5")
    lines = (out + err).splitlines()
    assert len(lines) <= 12 and max(len(line) for line in lines) < 1000, out + err
    assert not [n for n in NOISE if n in out + err], out + err
    assert "ctr: step 10/10 loss=" in err and "ctr: trained to step 10" in out
    assert '"AUC":' in out and "vocabularies from" in err  # the results, the project's own INFO


def test_verbosity_brings_the_libraries_logs_back(tiny_world, tmp_path):
    _, err = run("-m", "trainer.task", "--stage=pretrain", f"--data_dir={tiny_world}",
                 f"--model_dir={tmp_path / 's1'}", "--train_steps=2", "--batch_size=8",
                 "--depth=10", "--width_multiplier=0.5", "--feature_dim=16", "--log_interval=1",
                 "--verbosity=0")
    assert "cudart_stub" in err or "cpu_feature_guard" in err  # TensorFlow's C++ INFO lines
    assert "controller.py" in err and "train | step" in err  # Orbit's, through absl's handler


def test_beam_pipelines_import_quietly():
    out, err = run("-m", "trainer.pipelines.vocab", "--help")
    assert "--verbosity" in out and err == "", err


@pytest.mark.parametrize("argv, expected", [
    ([], console.QUIET), (["--stage=ctr"], console.QUIET), (["--verbosity=1"], 1),
    (["--verbosity", "0"], 0), (["-v", "2"], 2), (["-v1"], 1), (["--v=0"], 0),
    (["-v"], console.QUIET), (["--verbosity=-1"], -1)])
def test_verbosity_is_read_before_flags_are_parsed(argv, expected):
    assert console.verbosity_in(argv) == expected


def _record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_the_quiet_filter_keeps_the_run_and_drops_listed_noise_only():
    keep = console._Quiet().filter
    assert keep(_record("trainer.ctr.tables", logging.INFO, "vocabularies from 10 records"))
    assert not keep(_record("absl", logging.INFO, "train | step: 10"))
    assert not keep(_record("tensorflow", logging.WARNING, "Skipping full serialization of TF-"
                            "Keras layer <tensorflow_recommenders.tasks.ranking.Ranking at 0x1>"))
    # A library's warning about the run itself stays.
    assert keep(_record("tensorflow", logging.WARNING, "Detecting that an object or model or "
                        "tf.train.Checkpoint is being deleted with unrestored values."))
    assert keep(_record("tensorflow", logging.WARNING, "Skipping full serialization of TF-Keras "
                        "layer <trainer.models.encoder.Encoder object>, because it is not built."))
    assert console._Format().format(_record("tensorflow", logging.WARNING, "w")) == \
        "warning (tensorflow): w"
    assert console._Format().format(_record("trainer.x", logging.ERROR, "e")) == "error: e"


def test_cpp_noise_is_dropped_from_fd_2_and_every_other_line_kept(capfd, monkeypatch):
    monkeypatch.setattr(console, "_quiet", True)
    with console.cpp_noise_dropped():
        os.write(2, b"2026-12-06 04:19:20.957747: E external/local_xla/xla/stream_executor/cuda/"
                    b"cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error\n")
        os.write(2, b"E0000 collective_ops.cc:1] Collective ops is aborted by: worker 1 died\n")
    with pytest.raises(RuntimeError), console.cpp_noise_dropped():
        os.write(2, b"a line before the error\n")
        raise RuntimeError("the block's error")
    err = capfd.readouterr().err
    assert "cuInit" not in err
    assert "Collective ops is aborted by: worker 1 died" in err and "a line before the error" in err
