"""Run vLLM from another Python (the main specplug venv): one engine per subprocess, started with
the Python of a venv that has vLLM (integrations/vllm/install_cpu.sh builds one).

One engine per process is not only tidiness: after numba/llvmlite is imported (vLLM's n-gram
proposer does), the next engine started in the same process fails (ENGINE_NOTES).  Single-process
runs on vLLM's CPU platform go through one warm server per Python (fork_server.py), which imports
vLLM once and forks a fresh process per run; SPECPLUG_VLLM_FORK_SERVER=0 turns it off.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VENV = os.path.join(REPO, ".venv-vllm")


def vllm_python() -> str:
    """SPECPLUG_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python."""
    path = os.environ.get("SPECPLUG_VLLM_PYTHON", os.path.join(DEFAULT_VENV, "bin", "python"))
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no vLLM venv python at {path}: run integrations/vllm/install_cpu.sh "
                           "(or set SPECPLUG_VLLM_PYTHON)")
    return path


def vllm_env(multiprocess: bool = False) -> dict:
    """CPU settings that worked (ENGINE_NOTES); multiprocess=False keeps the engine in-process.

    vLLM's cache (VLLM_CACHE_ROOT, default ~/.cache/vllm) is shared by every engine started
    here: its `modelinfos` entries spare each later engine a subprocess that re-imports vLLM to
    inspect the model class (measured: 32 s -> 18 s per tiny-model job on this 2-core CPU)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               # vLLM's n-gram proposer loads numba, whose threads otherwise make torch run on
               # two threads in that process whatever OMP_NUM_THREADS says (ENGINE_NOTES)
               NUMBA_NUM_THREADS=env.get("NUMBA_NUM_THREADS", env.get("OMP_NUM_THREADS", "1")),
               VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_python(args: list[str], workdir: str, multiprocess: bool = False, timeout: float = 300,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`<vllm python> args...` in workdir; raises with the log tail when it fails."""
    server = None if multiprocess or env_extra else _fork_server()
    if server is not None:
        proc = server.run(args, workdir, timeout)
    else:
        env = vllm_env(multiprocess)
        env.update(env_extra or {})
        proc = subprocess.run([vllm_python(), *args], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"vLLM subprocess {args} failed (rc {proc.returncode}):\n{tail}")
    return proc


def run_job(job: dict, workdir: str, name: str, timeout: float = 300) -> dict:
    """Run generate.run_job(job) in a fresh vLLM process; return its result dict."""
    os.makedirs(workdir, exist_ok=True)
    job_path = os.path.join(workdir, f"{name}.job.json")
    out_path = os.path.join(workdir, f"{name}.out.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    run_python(["-m", "specplug.integrations.vllm.generate", job_path, out_path], workdir,
               timeout=timeout)
    with open(out_path) as f:
        return json.load(f)


def run_jobs(jobs: dict[str, dict], workdir: str, workers: int | None = None,
             timeout: float = 300) -> dict[str, dict]:
    """Run several jobs, each in its own vLLM process, `workers` at a time (default
    SPECPLUG_VLLM_WORKERS, else 2: an engine with OMP_NUM_THREADS=1 keeps one core busy, and most
    of its start-up is single-threaded imports).  Returns name -> result; the first failure
    raises after the others finish."""
    workers = workers or int(os.environ.get("SPECPLUG_VLLM_WORKERS", "2"))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {name: pool.submit(run_job, job, workdir, name, timeout)
                   for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# -- the warm server (fork_server.py) -----------------------------------------------------------
_servers: dict[str, "_ForkServer | None"] = {}  # vLLM python -> its server (None: cannot fork)
_servers_lock = threading.Lock()


def _fork_server() -> "_ForkServer | None":
    if os.environ.get("SPECPLUG_VLLM_FORK_SERVER", "1") == "0":
        return None
    python = vllm_python()
    with _servers_lock:
        if python not in _servers:
            server = _ForkServer(python)
            _servers[python] = server if server.can_fork else None
            if server.can_fork:
                atexit.register(server.close)
        return _servers[python]


class _ForkServer:
    """The client side: sends runs to one fork_server process and waits for their ends."""

    def __init__(self, python: str):
        self.dir = tempfile.mkdtemp(prefix="specplug-vllm-fork-")
        self.log_path = os.path.join(self.dir, "server.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "specplug.integrations.vllm.fork_server"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=vllm_env(False), cwd=self.dir)
        hello = self.proc.stdout.readline()
        if not hello:
            self.proc.wait()
            raise RuntimeError(f"the vLLM fork server did not start (rc {self.proc.returncode}):\n"
                               + self._log_tail())
        self.can_fork = bool(json.loads(hello)["fork"])
        self.ended: dict[str, int] = {}  # run id -> exit status
        self.alive = True
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                self.ended[msg["id"]] = int(msg["rc"])
                self.cond.notify_all()
        with self.cond:
            self.alive = False
            self.cond.notify_all()

    def _send(self, msg: dict) -> None:
        with self.send_lock:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()

    def _log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-40:])

    def run(self, args: list[str], workdir: str, timeout: float) -> subprocess.CompletedProcess:
        """What subprocess.run([python, *args], cwd=workdir, capture_output=True, text=True)
        returns, from a child forked off the warm server."""
        rid = uuid.uuid4().hex
        out, err = (os.path.join(self.dir, f"{rid}.{k}") for k in ("stdout", "stderr"))
        self._send({"id": rid, "argv": list(args), "cwd": os.path.abspath(workdir),
                    "stdout": out, "stderr": err})
        with self.cond:
            done = self.cond.wait_for(lambda: rid in self.ended or not self.alive, timeout)
        if not self.alive and rid not in self.ended:
            raise RuntimeError("the vLLM fork server died:\n" + self._log_tail())
        if not done:
            self._send({"kill": rid})
            with self.cond:
                self.cond.wait_for(lambda: rid in self.ended or not self.alive, 30)
        texts = ["", ""]  # stdout, stderr: read, and removed either way
        for i, path in enumerate((out, err)):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    texts[i] = f.read()
                os.remove(path)
        rc = self.ended.pop(rid, None)
        if not done:
            raise subprocess.TimeoutExpired(args, timeout, *texts)
        return subprocess.CompletedProcess(args, rc, *texts)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
