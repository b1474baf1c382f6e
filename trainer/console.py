"""What a command prints: its own progress and results, the warnings that concern the user's run,
and errors. The libraries' logs come back with `--verbosity=0` (absl's `-v 0`: INFO) or `1`
(DEBUG); the default, -1, is absl's own.

Library noise reaches the console by four routes, each quietened where it arises:
- TensorFlow's C++ log on file descriptor 2: its INFO and WARNING lines are off by
  TF_CPP_MIN_LOG_LEVEL=2 (`trainer/__init__` sets it before TensorFlow loads, unless the command
  line asks for verbosity). Its ERROR lines stay, except those in `CPP_NOISE`, which say nothing
  true about the run (the CUDA probe failing on a machine without a GPU driver: TensorFlow then
  runs on the CPU, as intended); a command probes the devices with file descriptor 2 captured
  (`absl_run`, `setup`), so that those lines can be dropped and every other line is printed.
- Python logging: the project's loggers (`trainer.*`, `export.*`, `serving.*`, `__main__`) print
  at INFO as bare messages, warnings as 'warning: ...'; every other logger prints from WARNING,
  except the messages in `LOG_NOISE`.
- `print` of libraries: Orbit prints a line per training loop and checkpoint (duplicating the
  project's own progress line); `library_prints` sends them to the 'orbit' logger at INFO.
- Python warnings: google.api_core's FutureWarning about Python versions (`trainer/__init__`).

Nothing in `CPP_NOISE` or `LOG_NOISE` is a warning about the user's data, model or cluster; a
pattern goes in only with the reason it is noise beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

QUIET = -1  # absl's default verbosity: the libraries' logs off
_quiet = False  # set by a command's `setup`: library code imported elsewhere prints as it would

# TensorFlow C++ ERROR lines that are not errors of the run.
CPP_NOISE = re.compile("|".join([
    # TF >= 2.18 on a machine without the CUDA driver: the CUDA platform's probe fails, and
    # TensorFlow uses the CPU (a machine with GPUs has the driver and prints nothing).
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    # TF 2.17's wheel registers its CUDA plugins twice (tensorflow/tensorflow#62075).
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    # absl's C++ logging (grpc's core, TF1 sessions) says where it writes before its first line.
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    # An INFO line through absl's C++ logging, which TF_CPP_MIN_LOG_LEVEL does not reach: a TF1
    # session (the stand-in model server, saved_model_cli) notes that an optional pass is off.
    r"mlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is not enabled",
]))

# Python log messages, by logger prefix, that are not about the run.
LOG_NOISE: tuple[tuple[str, re.Pattern], ...] = (
    # TFRS's Ranking task holds the loss and metrics, no weights: the SavedModel serves without it.
    ("tensorflow", re.compile(r"Skipping full serialization of TF-Keras layer "
                              r"<tensorflow_recommenders\.tasks\.")),
    # Beam's optional Google Cloud I/O, on import: a gs:// path fails later, naming the scheme.
    ("", re.compile(r"Failed to import GCSFileSystem|apitools not found")),
    # The stand-in model server loads exports with TF1's loader on purpose: TF Serving does.
    ("tensorflow", re.compile(r"load \(from tensorflow\.python\.saved_model\.loader_impl\) is "
                              r"deprecated")),
    # Beam 2.77's RunInference imports `resource` in one try with its torch-only ModelManager, so
    # without torch it says `resource` is missing (it is not, on Linux) for a metric of its own.
    ("", re.compile(r"Resource module is not available for current platform")),
    # TensorFlow's own profiler (the FLOP count of scripts/bench_train.py) calls a TF1 helper it
    # deprecates; nothing the caller can change.
    ("tensorflow", re.compile(r"tensor_shape_from_node_def_name \(from tensorflow\.python\."
                              r"framework\.graph_util_impl\) is deprecated")),
    # A Beam job's own local Dask cluster, stopped after the job's results are in: a worker
    # that loaded TensorFlow takes longer to exit than the nanny waits, and the nanny ends it.
    ("distributed.nanny", re.compile(r"Worker process still alive after .* seconds, killing")),
)

_OWN = ("trainer", "export", "serving", "__main__", "scripts")


def verbosity_in(argv: Sequence[str]) -> int:
    """The verbosity a command line asks for (`--verbosity=N`, `--verbosity N`, `-v N`, `-vN`,
    `--v=N`), before flags are parsed: `trainer/__init__` reads it to decide TensorFlow's C++
    log level before TensorFlow loads."""
    value = None
    for i, arg in enumerate(argv):
        m = re.fullmatch(r"(?:--verbosity|--v|-v)(?:=(-?\d+))?|-v(-?\d+)", arg)
        if not m:
            continue
        given = m.group(1) or m.group(2)
        if given is None and i + 1 < len(argv) and re.fullmatch(r"-?\d+", argv[i + 1]):
            given = argv[i + 1]
        if given is not None:
            value = int(given)
    return QUIET if value is None else value


class CommandLine(argparse.ArgumentParser):
    """An argparse parser for a command: with `--verbosity` / `-v` (as absl defines it for absl
    commands), and the console set up as soon as the flags are parsed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbosity", type=int, default=QUIET,
                          help="-1 (default): the command's own output, warnings and errors; 0: "
                               "also the libraries' INFO logs (TensorFlow, absl, Beam, Orbit); "
                               "1: DEBUG too.")

    def parse_known_args(self, args: Any = None, namespace: Any = None
                         ) -> tuple[Any, list[str]]:  # parse_args calls it
        parsed, rest = super().parse_known_args(args, namespace)
        setup(parsed.verbosity)
        return parsed, rest

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", argparse.ArgumentParser)  # one --verbosity, the main's
        return super().add_subparsers(**kwargs)


def absl_run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` for an absl command, with the console set up before `main` runs.
    absl's `--verbosity` / `-v` counts only when given: its value is not a default to trust
    (libraries set it to INFO on import). TensorFlow lists its devices in an absl init callback,
    before `main`: they are probed first, here, with the C++ noise dropped."""
    from absl import app, flags

    global _quiet
    _quiet = verbosity_in(sys.argv[1:]) <= QUIET
    if "tensorflow" in sys.modules:
        _probe_devices_quietly()

    def run(argv: list[str]) -> None:
        flag = flags.FLAGS["verbosity"]
        setup(flag.value if flag.present else QUIET)
        main(argv)

    app.run(run)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        own = record.name.split(".")[0] in _OWN or record.name == "root"
        if record.levelno < logging.WARNING:
            return message if own else f"{record.name}: {message}"
        level = "warning" if record.levelno < logging.ERROR else "error"
        return f"{level}: {message}" if own else f"{level} ({record.name}): {message}"


class _Quiet(logging.Filter):
    """INFO of the project's loggers; WARNING and above of the others, less `LOG_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _OWN:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(record.name.startswith(prefix) and pattern.search(message)
                       for prefix, pattern in LOG_NOISE)


def setup(verbosity: int = QUIET) -> None:
    """Configures the console for a command (its entry point calls this once, after parsing its
    flags): quiet by default, the libraries' logs at INFO (0) or DEBUG (1+) when asked."""
    global _quiet
    _quiet = verbosity <= QUIET
    root = logging.getLogger()
    for handler in logging.getLogger("tensorflow").handlers[:]:  # it would print lines twice
        logging.getLogger("tensorflow").removeHandler(handler)
    for handler in root.handlers[:]:  # the console's: absl's, basicConfig's, an earlier setup's
        if _prints(handler) and (_quiet or not _is_absl(handler)):
            root.removeHandler(handler)
    if not _quiet:
        root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
        if not any(_prints(h) for h in root.handlers):
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.addFilter(_Quiet())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if "tensorflow" in sys.modules:  # a command that does not load TensorFlow stays light
        _probe_devices_quietly()


def is_quiet() -> bool:
    """Whether this process's command set the console quiet (`setup`)."""
    return _quiet


def _prints(handler: logging.Handler) -> bool:
    """Whether a root handler prints to the console (rather than to a file or a test's capture)."""
    return _is_absl(handler) or (type(handler) is logging.StreamHandler
                                 and handler.stream in (sys.stderr, sys.stdout))


@contextlib.contextmanager
def import_noise_dropped() -> Iterator[None]:
    """For imports that log (Beam warns about its optional cloud clients on import): while the
    block runs, the root logger prints to stderr all but `LOG_NOISE`. Without a handler, Python
    would print every warning through its last-resort handler, or install one of its own."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_Quiet())
    handler.setFormatter(_Format())
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _is_absl(handler: logging.Handler) -> bool:
    return type(handler).__name__ == "ABSLHandler"


_CAPTURE = threading.Lock()


@contextlib.contextmanager
def cpp_noise_dropped() -> Iterator[None]:
    """Runs the block with file descriptor 2 captured, then prints what was written to it except
    the lines of `CPP_NOISE` (everything, outside a quiet command). The capture is process-wide:
    blocks of several threads take turns."""
    if not _quiet:
        yield
        return
    with _CAPTURE, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not CPP_NOISE.search(line)))
            sys.stderr.flush()


def _probe_devices_quietly() -> None:
    """Lists the physical devices (which probes CUDA, once per process) with the C++ noise
    dropped; logical devices stay configurable afterwards."""
    import tensorflow as tf
    with cpp_noise_dropped():
        tf.config.list_physical_devices()


class _LineLogger(io.TextIOBase):
    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


@contextlib.contextmanager
def library_prints(name: str) -> Iterator[None]:
    """Sends what a library prints to stdout inside the block to the logger `name` at INFO
    (shown at verbosity 0 and up), unless the libraries' logs are on, when it prints as before.
    For libraries that print instead of logging (Orbit's controller)."""
    if not _quiet:
        yield
        return
    with contextlib.redirect_stdout(_LineLogger(logging.getLogger(name))):
        yield
