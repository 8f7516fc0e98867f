"""CUDA C sources (``*.cu``, ``*.cuh``), the one loader that compiles them, the launch helpers every cuda backend
shares (:mod:`.launch`) and the Hopper kernels' tensor maps (:mod:`.tensor_map`). No framework imports here."""

from .loader import KernelSpec, compile_all_to_cubin, get_kernel, precompile, register, registered

__all__ = ["KernelSpec", "compile_all_to_cubin", "get_kernel", "precompile", "register", "registered"]
