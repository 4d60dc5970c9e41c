"""The 95 % Wilson score interval of an accuracy measured on n items.

Wilson rather than the normal approximation p +- 1.96 sqrt(p(1-p)/n): at the sample
sizes quick runs use (50 to 200 tasks) and at accuracies near 0.25 (chance on four
endings) the normal interval is too narrow and can leave [0, 1]; Wilson's stays inside it
and keeps close to its nominal coverage. For n = 1,000 the two agree to about 0.001.

    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson interval of `successes` out of `n` (n >= 1).

    Raises:
        ValueError: n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
