"""Byte counts as people write them: `3MB`, `6GiB`, `1.5 GB`, `512` (what accelerate's `max_memory` takes).

Decimal units are powers of 1000 (KB, MB, GB, TB), binary ones powers of 1024 (KiB, MiB, GiB, TiB); case and a
space before the unit do not matter, and a bare number is bytes. Written here rather than taken from accelerate
(`accelerate.utils.convert_file_size_to_int`), which imports torch: the engine and replay never do.
"""

from __future__ import annotations

import re
from decimal import Decimal

UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
SIZE_FORMS = (
    "a positive whole number of bytes, or a size such as 3MB, 1.5GB or 6GiB (KB/MB/GB/TB = 1000^n, "
    "KiB/MiB/GiB/TiB = 1024^n)"
)


def parse_size(value: object, what: str = "size") -> int:
    """The bytes `value` (an int, or text such as "3MB", "6GiB", "1.5 GB") stands for; anything else, zero, or a
    size that is not a whole number of bytes is a ValueError naming `what` and the forms allowed."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        scale = UNITS.get(match.group(2).lower()) if match else None
        if match and scale is not None:
            number = Decimal(match.group(1)) * scale  # exact: 0.1KB is 100 B
            if number >= 1 and number == number.to_integral_value():
                return int(number)
    raise ValueError(f"{what} must be {SIZE_FORMS}, got {value!r}")
