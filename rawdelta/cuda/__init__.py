"""CUDA C sources (``*.cu``, ``*.cuh``) and the one loader that compiles them. No framework imports here."""

from .loader import KernelSpec, compile_all_to_cubin, get_kernel, precompile, register, registered

__all__ = ["KernelSpec", "compile_all_to_cubin", "get_kernel", "precompile", "register", "registered"]
