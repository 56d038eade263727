"""Helpers shared by the test files (import them: `from helpers import run_cli`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def cli_env(env_extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))


def run_cli(args: list[str], cwd, timeout: float = 400, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m smet_lab ARGS` in `cwd`, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "smet_lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env_extra))


def start_cli(args: list[str], cwd, stderr=subprocess.PIPE, env_extra: dict | None = None) -> subprocess.Popen:
    """The same, running in the background in its own process group (to signal it like Ctrl-C would)."""
    return subprocess.Popen([sys.executable, "-m", "smet_lab", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=cli_env(env_extra), start_new_session=True)


def run_to_a_gone_reader(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ARGS | head` where head has left before the first byte: stdout is a pipe whose read end is closed."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(args, cwd=cwd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=cli_env())
    finally:
        os.close(write)


def e2e(*case):
    """A parametrize case that runs only with -m "not slow" (CI), not in the developer's loop."""
    return pytest.param(*case, marks=pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_runs(db: Path):
    """(client, every run of every experiment) of a sqlite MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client, [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


class Died(Exception):
    """Raised by a die_after callback: the training process "dies" between two steps."""


def die_after(steps: int):
    """A Callbacks.should_stop that raises Died when polled the `steps`-th time (after that step)."""
    polls = [0]

    def poll() -> bool:
        polls[0] += 1
        if polls[0] == steps:
            raise Died
        return False

    return poll
