"""The compiled part of patchdb; everything else is declared in setup.cfg.

patchdb._windows, the sliding-window kernel of the exact backend (patchdb/windows.py), is optional:
where it cannot be compiled, patchdb installs without it and scores with matrix products.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "patchdb._windows",
    sources=["patchdb/_windows.c"],
    depends=["patchdb/_windows_isa.h", "patchdb/_windows_kernel.h"],
    extra_compile_args=["-O3", "-Wno-psabi"],
    optional=True,
)])
