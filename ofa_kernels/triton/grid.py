"""Launch-size arithmetic in plain Python.

``triton.next_power_of_2`` and ``triton.cdiv`` are ``constexpr`` functions in Triton 3.x: called from
Python they cost far more than plain arithmetic (RESULTS.md, "Built since, waiting for a GPU"), and a
launch called them five times. These are the same numbers for the positive ints the launchers pass.
"""


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)
