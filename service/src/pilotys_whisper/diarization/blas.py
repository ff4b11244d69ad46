"""One BLAS thread for the clustering: OpenBLAS's threads busy-wait, and on a loaded 2-core server they spent four
times the CPU of one thread on the eigendecompositions (bench/README.md)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator


@functools.cache
def _openblas_libraries() -> tuple:
    """The OpenBLAS libraries loaded in this process (NumPy and SciPy wheels each bring their own) that can set
    a thread-local thread count (OpenBLAS 0.3.27 and later)."""
    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return ()
    libraries = []
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
            setter = library.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        libraries.append(setter)
    return tuple(libraries)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Within it, BLAS and LAPACK calls of this thread run on one thread; elsewhere, nothing changes."""
    import numpy  # noqa: F401 - load the libraries before looking for them
    import scipy.linalg  # noqa: F401

    setters = _openblas_libraries()
    previous = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, count in zip(setters, previous, strict=True):
            setter(count)
