"""One training process per model dir: an exclusive lock file naming its holder.

Two jobs on one model dir would overwrite each other's checkpoints and both exit 0. The lock file
(`<model_dir>/LOCK`) holds the holder's host, pid and process start time; it is created with
O_EXCL, so of two processes starting at once exactly one gets it. It is released when the process
exits. A lock whose holder is gone (same host, no such process, or the pid reused by another
process) is stale and taken over with a message. A holder on another host cannot be checked from
here: the error names it, and the user removes the file once that job is known to be gone.

The workers of one multi-worker job coordinate through their collectives: only the chief locks.
On object stores (a path with `://`) the exclusive create is not atomic, only a check then write.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time

import tensorflow as tf

NAME = "LOCK"
_held: dict[str, bool] = {}  # lock path -> whether acquiring it created the model dir


class LockedError(RuntimeError):
    """The model dir is in use by another process."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = holder.get("started", "")
    return not started or not _start_time(pid) or _start_time(pid) == started


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _create(path: str, text: str) -> bool:
    """Creates `path` holding `text` unless it exists; whether it was created."""
    if "://" in path:
        if tf.io.gfile.exists(path):
            return False
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _read(path: str) -> dict:
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read() or "{}")
    except (tf.errors.NotFoundError, json.JSONDecodeError):
        return {}


def acquire(model_dir: str) -> None:
    """Takes `model_dir`'s lock for this process (again: a no-op), or raises LockedError naming
    the live holder. Released at exit."""
    path = os.path.join(model_dir, NAME)
    if path in _held:
        return
    created = not tf.io.gfile.exists(model_dir)
    tf.io.gfile.makedirs(model_dir)
    me = _me()
    for _ in range(3):  # a stale lock removed between two tries is taken on the next
        if _create(path, json.dumps(me)):
            _held[path] = created
            atexit.register(release, model_dir)
            return
        holder = _read(path)
        if holder.get("host") != me["host"] and holder:
            raise LockedError(
                f"{model_dir} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                f"(since {holder.get('since')}; {path}). Two jobs on one model dir overwrite each "
                "other's checkpoints: wait for it, use another --model_dir, or remove the lock "
                "file if that job is gone.")
        if holder and _alive(holder):
            raise LockedError(
                f"{model_dir} is in use by pid {holder['pid']} on this host (since "
                f"{holder.get('since')}; {path}). Two jobs on one model dir overwrite each "
                "other's checkpoints: wait for it or use another --model_dir.")
        print(f"lock: removing the stale lock of pid {holder.get('pid')} (no longer running) "
              f"in {model_dir}")
        try:
            tf.io.gfile.remove(path)
        except tf.errors.NotFoundError:
            pass
    raise LockedError(f"could not take the lock {path}: another process keeps creating it")


def release(model_dir: str) -> None:
    """Removes this process's lock on `model_dir` (if it holds it), and the dir itself if taking
    the lock created it and the run wrote nothing else (a run refused before it started)."""
    path = os.path.join(model_dir, NAME)
    if path not in _held:
        return
    created = _held.pop(path)
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            tf.io.gfile.remove(path)
        except tf.errors.NotFoundError:
            pass
    if created and tf.io.gfile.isdir(model_dir) and not tf.io.gfile.listdir(model_dir):
        tf.io.gfile.rmtree(model_dir)
