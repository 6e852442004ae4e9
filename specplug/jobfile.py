"""The engine-subprocess protocol the vLLM and SGLang integrations share.

    python -m <engine module> JOB.json RESULT.json   one job: one engine, results written atomically
    python -m <engine module> --session FD           one engine kept alive across many batches

A session reads one JSON message per line on stdin and answers each with one JSON line on file
descriptor FD (the engine's own logs keep stdout and stderr):
    {"open": {...}}   start the engine -> {"ready": true, "environment": {...}}
    {"run": {...}}    run one batch on it -> the engine's result dict
    {"close": true}   (or end of input) shut the engine down and exit
A message that raises is answered {"error": "Type: message"}; the session goes on.
Benchmarks use sessions so that arms alternate block by block without restarting engines.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from typing import Callable, Protocol


class EngineSessionError(RuntimeError):
    """An engine session died, timed out, or answered an error (first line: what; then the
    tail of its log)."""


class EngineSession(Protocol):
    def environment(self) -> dict: ...
    def run(self, batch: dict) -> dict: ...
    def close(self) -> None: ...


def run_job_files(argv: list[str] | None, module: str, run_job: Callable[[dict], dict],
                  before: Callable[[], None] | None = None,
                  open_session: Callable[[dict], EngineSession] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--session" and open_session is not None:
        if before:
            before()
        return serve_session(int(argv[1]), open_session)
    if len(argv) != 2:
        print(f"usage: python -m {module} JOB.json RESULT.json | --session FD", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    if before:
        before()
    result = run_job(job)
    with open(argv[1] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(argv[1] + ".tmp", argv[1])
    return 0


def serve_session(fd: int, open_session: Callable[[dict], EngineSession]) -> int:
    replies = os.fdopen(fd, "w", buffering=1)
    session = None
    _exit_with_parent()
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            if "close" in msg:
                break
            try:
                if "open" in msg:
                    if session is not None:
                        raise RuntimeError("this session already has an engine")
                    session = open_session(msg["open"])
                    reply = {"ready": True, "environment": session.environment()}
                elif session is None:
                    raise RuntimeError("send {'open': ...} before {'run': ...}")
                else:
                    reply = session.run(msg["run"])
            except Exception as e:  # noqa: BLE001 -- answered to the client, which decides
                reply = {"error": f"{type(e).__name__}: {e}"}
            replies.write(json.dumps(reply) + "\n")
    finally:
        if session is not None:
            session.close()
        replies.close()
    return 0


def _exit_with_parent() -> None:
    """A session outlives no client: on Linux the kernel sends SIGTERM when the parent dies (a
    benchmark killed mid-batch would otherwise leave its engines, and their schedulers, running),
    and SIGTERM unwinds through serve_session's `finally`, which shuts the engine down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.platform.startswith("linux"):
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request above took effect
        sys.exit(143)


class SessionClient:
    """The parent side of one engine session: a child `python -m module --session FD` whose
    logs go to log_path."""

    def __init__(self, python: str, module: str, env: dict, log_path: str, cwd: str | None = None):
        self.log_path = log_path
        read_fd, write_fd = os.pipe()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([python, "-m", module, "--session", str(write_fd)],
                                         stdin=subprocess.PIPE, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         pass_fds=(write_fd,), text=True)
        os.close(write_fd)  # the child holds the only writer: its exit is our end of file
        self.replies = os.fdopen(read_fd, "r")

    def call(self, msg: dict, timeout: float = 3600) -> dict:
        """Send one message, wait for its answer; raises EngineSessionError with the log tail
        when the child died, timed out or answered an error."""
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: reported below, from its log
        ready, _, _ = select.select([self.replies], [], [], timeout)
        line = self.replies.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            raise EngineSessionError(
                ("engine session timed out" if not ready else "engine session died")
                + f" (log {self.log_path}):\n" + self.log_tail())
        reply = json.loads(line)
        if "error" in reply:
            raise EngineSessionError(f"engine session: {reply['error']} (log {self.log_path})\n"
                                     + self.log_tail(15))
        return reply

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"close": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.replies.close()
