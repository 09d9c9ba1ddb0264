"""appliance: an on-prem LLM runtime that answers each request the cheapest way that keeps quality."""

import ctypes
import importlib.util
from pathlib import Path

__version__ = "0.1.0"


def _map_llama_cpp_libs() -> None:
    """Map libllama from llama_cpp's lib folder by the very path llama_cpp opens it with.

    Our extension asks for libllama (and through it libggml) by soname; had it been mapped first,
    llama_cpp's later open by file path would map a second copy. Mapped this way, both resolve to
    one copy of each library whichever package is imported first.
    """
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return
    lib = Path(spec.origin).parent / "lib" / "libllama.so"
    if lib.is_file():
        ctypes.CDLL(str(lib))


_map_llama_cpp_libs()


def _load_ggml_cpu_backend() -> None:
    """In a GGML_BACKEND_DL build, load the CPU backend variant for this machine (appliance.models.ggml_cpu)
    before anything asks ggml for a device."""
    from appliance.models import ggml_cpu

    ggml_cpu.load_at_import()


_load_ggml_cpu_backend()
