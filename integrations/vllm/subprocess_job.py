"""Run vLLM from another Python (the main specplug venv): one engine per subprocess, started with
the Python of a venv that has vLLM (integrations/vllm/install_cpu.sh builds one).

One engine per process is not only tidiness: after numba/llvmlite is imported (vLLM's n-gram
proposer does), the next engine started in the same process fails (ENGINE_NOTES).
"""
from __future__ import annotations

import json
import os
import subprocess
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
               VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_python(args: list[str], workdir: str, multiprocess: bool = False, timeout: float = 300,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`<vllm python> args...` in workdir; raises with the log tail when it fails."""
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
