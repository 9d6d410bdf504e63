"""Builds the optional compiled hot path (Cython): rtcsignal/protocol/_speedups.pyx (frame
reader), rtcsignal/core/_speedups.pyx (the common case of the relay) and
rtcsignal/server/_speedups.pyx (the transport glue around them). Everything else is in
pyproject.toml. A failed build is not fatal: the pure-Python modules are the fallback (and
``RTCSIGNAL_PURE=1`` selects them even when the build succeeded)."""

import hashlib

from setuptools import Extension, setup


def source_hash(path: str) -> str:
    """What the built module reports as SOURCE_HASH: the .pyx and the ``_slots.pxd`` it may
    cimport; the package compares it with the sources beside it and ignores a stale build."""
    digest = hashlib.sha256()
    for source in (path, "rtcsignal/_slots.pxd"):
        with open(source, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


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
         for layer in ("protocol", "core", "server")],
        compiler_directives={"language_level": 3},
        quiet=True,
    )

setup(ext_modules=ext_modules)
