"""Why fused_chunk_gla's backward takes split operands: a float64 model of GLA's gate gradient as a running carry.

The fused backward's dg is, per key, a running sum over the whole sequence of ``q_r * dq_r - k_r * dk_r``, terms that
cancel down to a much smaller gradient. This model runs the recurrence token by token in float64 (log-sigmoid gates,
K = V = 32, bf16-valued inputs) and rounds, as the kernels' operand tiles would, the state S in ``dq = S do``, the
state gradient dS in ``dk = dS v`` and the k that builds S: to bf16 (one 16-bit operand) or to a hi + lo pair of
bf16 (a split operand), and sums the carry in float32. It prints dg's relative RMS error against the float64 sums of
the unrounded terms for each case.

Usage: python3 benchmarks/gla_carry_precision.py [T ...]   (default 2048 8192; needs ml_dtypes)
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def rounded(x: np.ndarray, how: str) -> np.ndarray:
    """`x` as an operand tile holds it: ``"exact"``, ``"bf16"`` or ``"split"`` (hi + lo bf16 pair)."""
    if how == "exact":
        return x
    hi = x.astype(BF16).astype(np.float64)
    return hi if how == "bf16" else hi + (x - hi).astype(BF16).astype(np.float64)


def gate_gradient(T: int, operands: str, k_error: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(dg with the operands rounded and a float32 carry, dg in float64 throughout), ``[T, K]``; ``k_error``: S built
    from a k with a relative error up to 2^-9 (a bf16-rounded scaled k)."""
    rng = np.random.default_rng(seed)
    K = V = 32
    q, k, v, do = (rng.standard_normal((T, n)).astype(BF16).astype(np.float64) for n in (K, K, V, V))
    a = 1 / (1 + np.exp(-rng.standard_normal((T, K))))  # exp(log-sigmoid gate)
    k_state = k * (1 + rng.uniform(-2.0 ** -9, 2.0 ** -9, k.shape)) if k_error else k
    scale = K ** -0.5

    def run(how: str, kS: np.ndarray, carry: type) -> np.ndarray:
        S, states = np.zeros((K, V)), np.empty((T, K, V))
        for t in range(T):
            S = a[t][:, None] * S + np.outer(kS[t], v[t])
            states[t] = S
        dS, dq, dk = np.zeros((K, V)), np.empty((T, K)), np.empty((T, K))
        for t in range(T - 1, -1, -1):
            dS = dS + scale * np.outer(q[t], do[t])
            dq[t] = scale * rounded(states[t], how) @ do[t]
            dk[t] = rounded(dS, how) @ v[t]
            dS = a[t][:, None] * dS
        terms = (q * dq - k * dk).astype(carry)
        return np.cumsum(terms[::-1], axis=0, dtype=carry)[::-1].astype(np.float64)  # the running carry

    return run(operands, k_state, np.float32), run("exact", k, np.float64)


def main() -> int:
    for T in [int(x) for x in sys.argv[1:]] or [2048, 8192]:
        for operands, k_error in (("exact", False), ("bf16", False), ("split", False), ("split", True)):
            got, ref = gate_gradient(T, operands, k_error)
            err = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))
            what = f"{operands} operands" + (", S from a k off by up to 2^-9" if k_error else "")
            print(f"T = {T:6d}  {what:45s} dg relative RMS error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
