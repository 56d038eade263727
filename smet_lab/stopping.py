"""How a job is asked to stop: Ctrl-C, SIGTERM, or its output's reader going away (`| head`). Each
stops a run at its next step boundary (checkpointed, MLflow run KILLED, resumable) and a sweep as
Ray Tune stops on Ctrl-C, instead of dying mid-write with its MLflow runs left RUNNING. Every
command-line entry point (`clean_exit`) ends with an exit code and at most one line, never a traceback."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time

EXIT_READER_GONE = 141  # what a shell reports for a process that SIGPIPE ended, as `yes | head` does


class StopRequest:
    """Ctrl-C or SIGTERM asks the run to stop at the next step boundary (never in the middle of a
    database write, which could leave the MLflow store locked or a run RUNNING); a second signal
    stops at once, unless it follows the first within a second: torchrun passes the terminal's Ctrl-C
    on as SIGTERM to processes that got it already."""

    def __init__(self):
        self.requested, self.at = False, 0.0

    def __call__(self, signum, frame):
        if self.requested:
            if time.monotonic() - self.at < 1.0:
                return
            raise KeyboardInterrupt
        self.requested, self.at = True, time.monotonic()
        if os.environ.get("RANK", "0") == "0":
            print("smet_lab: stopping after this step (signal again to stop at once)", file=sys.stderr)

    def is_set(self) -> bool:
        return self.requested


STOP = StopRequest()


class ClosedPipeStops:
    """stdout that, once its reader has gone, sends the output to /dev/null and asks the job to stop
    as Ctrl-C does (Python would raise BrokenPipeError from whichever print came next). Everything
    but write and flush is the stream's own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered, and all later output, goes nowhere
        os.close(devnull)
        os.kill(os.getpid(), signal.SIGINT)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM set STOP (a request, never an exception in the middle of an import)."""
    signal.signal(signal.SIGINT, STOP)
    signal.signal(signal.SIGTERM, STOP)


def stop_when_reader_gone() -> None:
    """A closed stdout sends SIGINT: STOP in a run, Ray Tune's own handler in a sweep."""
    if not isinstance(sys.stdout, ClosedPipeStops):
        sys.stdout = ClosedPipeStops(sys.stdout)


def clean_exit(main):
    """A command-line entry point whose stdout reader may leave early (`--help | head -3`) or that is
    interrupted outside a job's own stop handling: it ends with EXIT_READER_GONE, or 130 and one line,
    instead of a traceback (from a print, from the flush at exit, or from wherever Ctrl-C landed)."""

    @functools.wraps(main)
    def entry(*args, **kwargs):
        try:
            try:
                return main(*args, **kwargs)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere at exit
            os.close(devnull)
            sys.exit(EXIT_READER_GONE)
        except KeyboardInterrupt:
            print("smet_lab: interrupted", file=sys.stderr)
            sys.exit(130)

    return entry
