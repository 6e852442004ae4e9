"""Server mode: a real `python -m sglang.launch_server` subprocess and a small HTTP client for it.

    with SGLangServer(target, python=sglang_python(), spec=speculative_kwargs("draft", D, 4)) as s:
        out = s.generate([5, 6, 7], max_new_tokens=32)       # POST /generate
        reply = s.chat("hello", max_tokens=16)                # POST /v1/chat/completions
        text = s.chat_stream("hello", max_tokens=16)          # the same, streamed

Used by the engine tests and the benchmark tool (`generate_requests` runs a batch concurrently and
returns what run_sglang returns).  Only loopback addresses are used.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from specplug.engine.rows import Request, RequestOutput
from specplug.stats import SpecStats
from specplug.types import SamplingParams

from .cpu import cpu_env, on_cpu
from .generate import device_kwargs, stats_of, to_output, _params

HOST = "127.0.0.1"


# Below Linux's ephemeral range (32768-60999): the kernel hands ports from that range to every
# outgoing connection and every bind(0) of the processes running beside (vLLM's and SGLang's own
# sockets in CI), so a port picked there and released was seen taken before launch_server bound it
PORT_RANGE = (20000, 32000)
# what launch_server logs (and then hangs on, its workers alive) when its port was taken meanwhile
PORT_TAKEN = ("address already in use", "errno 98")


def free_port() -> int:
    """A loopback port that nothing holds now, drawn from PORT_RANGE."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


def cli_args(settings: dict) -> list[str]:
    """{"speculative_num_steps": 4, "disable_cuda_graph": True} -> launch_server flags."""
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    return args


class SGLangServer:
    """One launch_server process on a free loopback port; stopped on exit (or by stop())."""

    def __init__(self, target: str, python: str, spec: dict | None = None,
                 extra: dict | None = None, log_path: str | None = None,
                 env: dict | None = None, prefix: list[str] | None = None):
        cpu = on_cpu()
        self._settings = {"model_path": target, "host": HOST, "dtype": "float32",
                          **device_kwargs(cpu), **(spec or {}), **(extra or {})}
        # prefix: how Python starts the launcher (tests put a patching `-c` script here); by
        # default the documented command: launch_cpu.py on CPU, else SGLang's own
        default = ["-m", "specplug.integrations.sglang.launch_cpu" if cpu else "sglang.launch_server"]
        self._launcher = [python, *(prefix or default)]
        env = dict(os.environ, **(env or {}))
        self.env = cpu_env(env) if cpu else env  # the stand-ins, for a custom prefix too
        self._fixed_log = log_path
        self._use_port(free_port())
        self.proc: subprocess.Popen | None = None

    def _use_port(self, port: int) -> None:
        self.port = port
        self.command = [*self._launcher, *cli_args({**self._settings, "port": port})]
        self.log_path = self._fixed_log or os.path.join("/tmp", f"specplug-sglang-{port}.log")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 300, attempts: int = 3) -> "SGLangServer":
        """Launch and wait for /health; a port taken between our check and the server's bind
        (another process won the race) means a new port and a new launch, not a 300 s hang."""
        for attempt in range(attempts):
            if attempt:
                self._use_port(free_port())
            if self._launch(timeout):
                return self
        raise RuntimeError(f"launch_server found its port taken {attempts} times:\n"
                           + self.log_tail())

    def _launch(self, timeout: float) -> bool:
        """True once the server answers; False (server stopped) if its port was taken."""
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_taken():
                self.stop()
                return False
            if self.proc.poll() is not None:
                raise RuntimeError(f"launch_server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                self._get("/health")
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"launch_server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def port_taken(self) -> bool:
        text = self.log_text().lower()
        return any(sign in text for sign in PORT_TAKEN)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP -----------------------------------------------------------------------------------
    def _get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return r.read().decode()

    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def generate(self, input_ids: list[int], **sampling) -> dict:
        """POST /generate with token ids; returns SGLang's JSON (output_ids, text, meta_info)."""
        return self.post("/generate", {"input_ids": input_ids, "sampling_params": sampling})

    def chat(self, content: str, **params) -> dict:
        return self.post("/v1/chat/completions",
                         {"model": "default", "messages": [{"role": "user", "content": content}],
                          **params})

    def chat_stream(self, content: str, timeout: float = 300, **params) -> str:
        """POST /v1/chat/completions with stream=True; returns the text its deltas add up to."""
        body = {"model": "default", "messages": [{"role": "user", "content": content}],
                "stream": True, **params}
        req = urllib.request.Request(self.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        parts = []
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:  # server-sent events: "data: {chunk}" lines, then "data: [DONE]"
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return "".join(parts)
                for choice in json.loads(data).get("choices", []):
                    parts.append((choice.get("delta") or {}).get("content") or "")
        raise RuntimeError("the chat stream ended without its [DONE] event")


def generate_requests(server: SGLangServer, requests: list[Request],
                      sampling: SamplingParams = SamplingParams(), ignore_eos: bool = False,
                      concurrency: int = 32) -> tuple[list[RequestOutput], SpecStats]:
    """Send every request at once (up to `concurrency` in flight), like run_sglang's batch."""
    def one(req: Request) -> dict:
        return server.post("/generate", {"input_ids": req.prompt_ids,
                                         "sampling_params": _params(req, sampling, ignore_eos)})

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(requests)))) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    outputs = [to_output(r, res) for r, res in zip(requests, results)]
    return outputs, stats_of(outputs, results, wall)
