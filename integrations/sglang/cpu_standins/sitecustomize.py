"""CPU stand-in: let SGLang's intel_amx attention backend run on CPUs without AMX.

SGLang rewrites `--attention-backend intel_amx` to `torch_native` on CPUs without AMX, and
speculative decoding does not run on torch_native.  The pure-torch ops in ./sgl_kernel do not
need AMX, so once `sglang.srt.runtime_context` is imported this says the platform has it, for
that one reader only (the model layers keep their own AMX probe and stay on plain torch).
Active only with SGLANG_USE_CPU_ENGINE=1; Python imports this file itself when this folder is on
PYTHONPATH, in every process SGLang starts.
"""
import importlib.abc
import os
import sys

_TARGET = "sglang.srt.runtime_context"


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
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

        def exec_then_override(module):
            exec_module(module)
            module.override_platform(has_amx=True).install()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_then_override
        return spec


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    sys.meta_path.insert(0, _AfterImport())
