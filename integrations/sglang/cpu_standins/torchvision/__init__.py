"""CPU stand-in for torchvision (the PyPI wheel is a CUDA build that breaks imports here).

SGLang imports torchvision names at module load for its multimodal processors, which text-only
CPU tests never run.  Every `torchvision.*` submodule imports; every name is a placeholder that
supports attribute access (`InterpolationMode.BICUBIC`) and fails loudly when actually used.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+specplug.stub"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {type(self).__name__} is not available "
                           "(specplug's SGLang CPU stand-ins serve text-only models)")


def _placeholder(name: str) -> type:
    return _PlaceholderMeta(name, (_Placeholder,), {})


def _module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{module_name}.{name}")
    return __getattr__


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_getattr(spec.name)
        return mod

    def exec_module(self, module):
        pass


__getattr__ = _module_getattr(__name__)
if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())
