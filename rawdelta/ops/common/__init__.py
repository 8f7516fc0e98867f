"""Host pieces shared by every op family: backend choice, Numba import, chunk helpers."""
