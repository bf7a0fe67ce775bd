"""Where NaN/Inf started, from what the device recorded for a flush window.

On the host every measurement reports its NaN/Inf counts at once, so the origin of a call is
simply the first event in execution order. On a device, a slot only records the first and last
root call of the window on which it held NaN/Inf; :func:`device_origins` rebuilds the origins
from those ranges and the positions' execution order.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping


def device_origins(
    ranges: Mapping[Hashable, tuple[int, int]], order: Mapping[Hashable, int]
) -> dict[Hashable, tuple[int, Hashable]]:
    """For each key with NaN/Inf: (its first call, the origin of that call).

    The origin of call ``c`` is, among the keys whose non-finite range covers ``c``, the one
    first in execution order. A key that went non-finite on an earlier call of the window and
    finite again before ``c`` is still counted as covering ``c``; the host path has no such
    approximation.
    """
    out = {}
    for key, (first, _) in ranges.items():
        covering = [k for k, (lo, hi) in ranges.items() if lo <= first <= hi]
        origin = min(covering, key=lambda k: (order.get(k, len(order)), str(k)))
        out[key] = (first, origin)
    return out
