"""Build the C engine (visualad._engine) against NumPy and the scipy-openblas32 wheel.

OpenBLAS comes from the `scipy-openblas32` wheel (headers + libscipy_openblas.so, all symbols
prefixed `scipy_`).  The extension is linked with an rpath relative to itself
($ORIGIN/../scipy_openblas32/lib) so an installed package finds the library without any
environment variable; `visualad/_blas.py` also preloads the library as a fallback (e.g. for
in-place builds).
"""
import glob
import sys

import numpy
import scipy_openblas32
from setuptools import Extension, setup

extra_compile_args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-math-errno", "-D_GNU_SOURCE"]
extra_link_args = []
if sys.platform.startswith("linux"):
    extra_link_args += ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib", "-pthread"]
elif sys.platform == "darwin":
    extra_link_args += ["-Wl,-rpath,@loader_path/../scipy_openblas32/lib"]

engine = Extension(
    "visualad._engine",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=sorted(glob.glob("csrc/*.h")),
    include_dirs=[numpy.get_include(), scipy_openblas32.get_include_dir(), "csrc"],
    library_dirs=[scipy_openblas32.get_lib_dir()],
    libraries=[scipy_openblas32.get_library()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(ext_modules=[engine])
