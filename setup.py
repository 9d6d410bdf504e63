"""Builds the optional compiled hot path (Cython): rtcsignal/protocol/_speedups.pyx (frame
reader) and rtcsignal/core/_speedups.pyx (the common case of the relay). Everything else is in
pyproject.toml. A failed build is not fatal: the pure-Python modules are the fallback (and
``RTCSIGNAL_PURE=1`` selects them even when the build succeeded)."""

import hashlib

from setuptools import Extension, setup


def source_hash(path: str) -> str:
    """What the built module reports as SOURCE_HASH; the package compares it with the .pyx
    beside it and ignores a stale build."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


try:
    from Cython.Build import cythonize
except ImportError:  # no Cython: no compiled path
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension(f"rtcsignal.{layer}._speedups", [f"rtcsignal/{layer}/_speedups.pyx"],
                   define_macros=[("RTCSIGNAL_SOURCE_HASH",
                                   f'"{source_hash(f"rtcsignal/{layer}/_speedups.pyx")}"')],
                   extra_compile_args=["-O2"], optional=True)
         for layer in ("protocol", "core")],
        compiler_directives={"language_level": 3},
        quiet=True,
    )

setup(ext_modules=ext_modules)
