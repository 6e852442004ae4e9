"""Launch SGLang's server (OpenAI-compatible) with a specplug algorithm on a machine without a GPU:

    .venv-sglang/bin/python -m specplug.integrations.sglang.launch_cpu --model-path TARGET \\
        --speculative-algorithm SPECPLUG_DRAFT --speculative-draft-model-path DRAFT \\
        --speculative-num-steps 4 --speculative-eagle-topk 1 --speculative-num-draft-tokens 5

The arguments are `python -m sglang.launch_server`'s.  This replaces itself with that command,
adding the CPU settings it needs (generate.device_kwargs: --device cpu, the intel_amx attention
backends, no CUDA graphs, a KV pool cap, --sleep-on-idle) unless given, in an environment where
specplug's CPU stand-ins are active (cpu.py says what they are).  On a GPU machine run
`python -m sglang.launch_server` itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def command(argv: list[str]) -> list[str]:
    """The launch_server command line: argv plus every CPU setting argv does not give."""
    from .generate import device_kwargs
    from .server import cli_args
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra = []
    for key, value in device_kwargs(cpu=True).items():
        if "--" + key.replace("_", "-") not in given:
            extra += cli_args({key: value})
    return [sys.executable, "-m", "sglang.launch_server", *argv, *extra]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("sglang") is None:
        print(f"specplug: {sys.executable} has no SGLang; run this with the SGLang venv's Python "
              "(integrations/sglang/install_cpu.sh builds .venv-sglang)", file=sys.stderr)
        return 2
    from .cpu import cpu_env
    cmd = command(argv)
    os.execve(cmd[0], cmd, cpu_env())


if __name__ == "__main__":
    sys.exit(main())
