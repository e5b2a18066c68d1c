"""The compiled parts of patchdb; everything else is declared in setup.cfg.

Both extensions are optional: where they cannot be compiled, patchdb installs without them and scores
with matrix products.
- patchdb._windows: the sliding-window kernel of the exact backend (patchdb/windows.py);
- patchdb._clusters: the top-k backend's scores of the clusters each query visits (patchdb/topk.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("patchdb._windows", sources=["patchdb/_windows.c"],
              depends=["patchdb/_buffers.h", "patchdb/_exp2.h", "patchdb/_windows_isa.h", "patchdb/_windows_kernel.h"],
              extra_compile_args=["-O3", "-Wno-psabi"], optional=True),
    Extension("patchdb._clusters", sources=["patchdb/_clusters.c"],
              depends=["patchdb/_buffers.h", "patchdb/_clusters_kernel.h", "patchdb/_exp2.h"],
              extra_compile_args=["-O3", "-Wno-psabi"], optional=True),
])
