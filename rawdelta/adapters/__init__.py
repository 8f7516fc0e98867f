"""Framework adapters: the only code that imports torch or jax, and only when these modules are imported.

``rawdelta.torch`` and ``rawdelta.jax`` are the public names (they re-export :mod:`rawdelta.adapters.torch`
and :mod:`rawdelta.adapters.jax`). Importing this package imports neither framework.
"""
