"""Make sure libscipy_openblas.so is loaded before the C engine is imported.

The installed extension carries an rpath to ``../scipy_openblas32/lib``; this preload covers the
other layouts (in-place builds, a scipy-openblas32 installed in another site directory)."""
import ctypes
import os
import sys


def preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("visualad needs the 'scipy-openblas32' package (pip install scipy-openblas32)") from exc
    lib_dir = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()
    if sys.platform.startswith("win"):  # pragma: no cover
        os.add_dll_directory(lib_dir)
        return
    ext = ".dylib" if sys.platform == "darwin" else ".so"
    path = os.path.join(lib_dir, "lib" + name + ext)
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
