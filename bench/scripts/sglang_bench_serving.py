"""Runs sglang's own `python -m sglang.bench_serving` (unchanged) without torch.

sglang 0.5's bench_serving imports sglang.srt.utils, which imports torch (and, through it,
GPU libraries) at module level, although the benchmark client never calls into them. This
wrapper installs an import hook that answers `torch`, `triton` and friends with inert stub
modules, then runs bench_serving's CLI with the given arguments:

    python bench/scripts/sglang_bench_serving.py --backend sglang-oai --base-url ... [flags]

Needs, from PyPI: sglang (--no-deps), numpy, aiohttp, msgspec, orjson, requests, tqdm,
transformers, psutil, pybase64 (see scripts/test.sh).
"""

import importlib
import importlib.abc
import importlib.machinery
import runpy
import sys
import types
import warnings

# Top-level packages bench_serving's import chain touches but never uses on the client path.
STUBBED = {"torch", "triton", "torchvision", "torchaudio", "sgl_kernel", "flashinfer", "tvm_ffi", "compressed_tensors"}


class _Inert:
    """Any attribute, call, index, iteration or comparison gives something harmless."""

    def __init__(self, name="stub"):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        if item == "name":
            # e.g. torch.library.Library(...).m.name, used as an attribute name.
            return self._name.replace(".", "_")
        return _Inert(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        # Used as a decorator (`@torch.compile`, `@triton.jit`): hand the function back.
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _Inert(f"{self._name}()")

    def __getitem__(self, item):
        return _Inert(f"{self._name}[]")

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __int__(self):
        return 0

    def __index__(self):
        return 0

    def __float__(self):
        return 0.0

    def __str__(self):
        return "0.0"

    def __lt__(self, other):
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __eq__(self, other):
        return other is self

    def __hash__(self):
        return id(self)

    def __or__(self, other):
        return self

    # Arithmetic on stub constants (e.g. `-torch.finfo(...).max`) at import time.
    __ror__ = __and__ = __rand__ = __add__ = __radd__ = __sub__ = __rsub__ = __or__
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __floordiv__ = __pow__ = __or__

    def __neg__(self):
        return self

    __pos__ = __abs__ = __invert__ = __neg__

    def __mro_entries__(self, bases):
        # `class X(torch.nn.Module, ABC)`: drop the stub from the bases.
        return ()


# torch_npu adds torch.npu; sglang treats its presence as "an NPU must be there".
ABSENT = {"npu"}


KNOWN = {"torch.version": {"cuda": None, "hip": None, "__version__": "2.9.0"}}


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if (item.startswith("__") and item.endswith("__")) or item in ABSENT:
            raise AttributeError(item)
        if f"{self.__name__}.{item}" in KNOWN:
            return importlib.import_module(f"{self.__name__}.{item}")
        return _Inert(f"{self.__name__}.{item}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "2.9.0"
        # A CPU-only build: no CUDA or ROCm version.
        for attr, value in KNOWN.get(spec.name, {}).items():
            setattr(module, attr, value)
        return module

    def exec_module(self, module):
        pass


# HF `kernels` (a transformers dependency) needs a real torch; hidden, transformers falls back
# to its no-kernels path (importlib.util.find_spec gives None for a None entry).
HIDDEN = {"kernels"}



def install_stubs():
    """Makes `import sglang.benchmark.serving` work without torch (see the module doc)."""
    for name in HIDDEN:
        sys.modules[name] = None
    sys.meta_path.insert(0, _StubFinder())
    warnings.simplefilter("ignore", FutureWarning)


if __name__ == "__main__":
    install_stubs()
    sys.argv = ["sglang.bench_serving"] + sys.argv[1:]
    runpy.run_module("sglang.bench_serving", run_name="__main__", alter_sys=True)
