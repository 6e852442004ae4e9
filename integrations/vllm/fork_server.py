"""A warm vLLM Python: imports vLLM once, then forks one child process per job.

Every vLLM engine specplug starts gets a process of its own (subprocess_job.py says why), and on a
2-core CPU most of a small job is `from vllm import LLM` (measured: 14 s of CPU, of ~18 s for a
tiny-model job).  This server pays that import once; each child starts from the imported modules
(copy-on-write) and runs exactly what `python ARGV...` would run.  The server itself never builds
an engine, so no engine state (numba, the distributed groups, OpenMP pools) exists before a fork.

Protocol: one JSON object per line.
  stdin   {"id": str, "argv": ["-m", module, ...] | [script, ...], "cwd": dir,
           "stdout": file, "stderr": file}      start a child
          {"kill": id}                          SIGKILL that child's process group
  stdout  {"ready": pid, "fork": bool}          once, after the imports; fork false (not the
                                                CPU platform): the server exits at once
          {"id": id, "rc": exit status}         when a child ends (-N: killed by signal N)
The server exits when stdin closes and its last child has ended.

    python -m specplug.integrations.vllm.fork_server
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import select
import signal
import sys
import traceback


def _preimport() -> bool:
    """Import what every job imports; returns whether forking is safe here (CPU platform only:
    a CUDA runtime touched before fork() cannot be used in the child)."""
    import vllm  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.platforms import current_platform

    import specplug.integrations.vllm.generate  # noqa: F401
    # the imported heap is never garbage: frozen, no child's gc pass walks it again, and its
    # pages stay shared with the children
    gc.freeze()
    return current_platform.is_cpu()


def _run_child(req: dict) -> int:
    """In the forked child: become `python argv...` with its own stdio; returns the exit code."""
    os.setpgid(0, 0)  # so that a kill reaches whatever the job starts
    os.chdir(req["cwd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    # fresh stream objects: the parent's may hold a lock or a buffer taken before the fork
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    argv = list(req["argv"])
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script`
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports whatever ended it, as python would
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what interpreter exit would run (vLLM's shutdown hooks)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> int:
    proto = os.dup(1)
    os.dup2(2, 1)  # stray prints (vLLM's import-time notes) must not reach the protocol channel
    can_fork = _preimport()
    send = lambda msg: os.write(proto, (json.dumps(msg) + "\n").encode())  # noqa: E731
    send({"ready": os.getpid(), "fork": can_fork})
    if not can_fork:
        return 0
    children: dict[int, str] = {}  # pid -> job id
    buf, stdin_open = b"", True
    while stdin_open or children:
        if stdin_open and select.select([0], [], [], 0.05)[0]:
            data = os.read(0, 1 << 16)
            stdin_open = bool(data)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                if "kill" in req:
                    for pid in [p for p, job in children.items() if job == req["kill"]]:
                        _kill_group(pid)
                    continue
                pid = os.fork()
                if pid == 0:  # the child never returns into this loop, whatever happens
                    os.close(proto)
                    code = 1
                    try:
                        code = _run_child(req)
                    finally:
                        os._exit(code)
                children[pid] = req["id"]
        elif not stdin_open:
            select.select([], [], [], 0.05)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            send({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})
    return 0


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group, or the child alone if it has none yet
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(serve())
