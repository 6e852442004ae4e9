"""CPU stand-ins applied as SGLang's modules are imported (after each one's own code ran).

* `sglang.srt.runtime_context`: let SGLang's intel_amx attention backend run on CPUs without
  AMX.  SGLang rewrites `--attention-backend intel_amx` to `torch_native` on CPUs without AMX,
  and speculative decoding does not run on torch_native.  The pure-torch ops in ./sgl_kernel do
  not need AMX, so this says the platform has it, for that one reader only (the model layers
  keep their own AMX probe and stay on plain torch).
* `sglang.srt.entrypoints.engine`: start the scheduler and detokenizer processes by fork.
  SGLang sets multiprocessing's 'spawn', which CUDA needs; on the CPU each spawned child imports
  SGLang and torch again, 10-20 s of CPU per child and per engine on a small machine, while a
  forked child starts from the parent's imports.  Left as it is when the function is missing.
Active only with SGLANG_USE_CPU_ENGINE=1; Python imports this file itself when this folder is on
PYTHONPATH, in every process SGLang starts.
"""
import importlib.abc
import os
import sys


def _claim_amx(module) -> None:
    module.override_platform(has_amx=True).install()


def _fork_children(module) -> None:
    original = getattr(module, "_set_envs_and_config", None)
    if original is None:
        return

    def set_envs_then_fork(*args, **kwargs):
        original(*args, **kwargs)  # ends with set_start_method("spawn", force=True)
        import multiprocessing
        multiprocessing.set_start_method("fork", force=True)

    module._set_envs_and_config = set_envs_then_fork


_PATCHES = {"sglang.srt.runtime_context": _claim_amx,
            "sglang.srt.entrypoints.engine": _fork_children}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    sys.meta_path.insert(0, _AfterImport())
