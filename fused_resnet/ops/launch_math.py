"""Integer helpers for launch grids and tile sizes, computed on the host at every launch.

triton.cdiv and triton.next_power_of_2 are Triton constexpr functions: called from Python each one costs about
4 µs (measured on the 2-core CPU, triton 3.6 and 3.8), and a conv launch called them four times. These are the
plain-Python equivalents for positive integers.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0, as Triton's)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
