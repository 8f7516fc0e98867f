"""Framework-free host code on raw arrays: one folder per op family. Never imports torch or jax."""
