"""Byte counts as people write them (`specmd.cache.sizes`), and every place that takes one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specmd.cache.config import CacheConfig
from specmd.cache.sizes import UNITS, parse_size


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("512", 512), ("3MB", 3_000_000), ("3mb", 3_000_000), ("1.5 GB", 1_500_000_000), ("6GiB", 6 * 2**30),
        (" 2 kib ", 2048), ("0.1KB", 100), ("1T", 10**12), ("7B", 7), (".5KiB", 512),
    ],
)  # fmt: skip
def test_sizes_as_people_write_them(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("value", [0, -1, "0", "-3MB", "0.5", "0.1B", "3XB", "", "MB", "nan", "1e9", True, 2.0, None])
def test_anything_else_is_one_error_naming_the_forms(value: object) -> None:
    with pytest.raises(ValueError, match=r"^cache_bytes must be a positive whole number of bytes, or a size such as"):
        parse_size(value, "cache_bytes")


@given(st.integers(1, 10**6), st.sampled_from(sorted(UNITS)))
def test_a_whole_count_of_any_unit(count: int, unit: str) -> None:
    assert parse_size(f"{count}{unit}") == parse_size(f"{count} {unit.upper()}") == count * UNITS[unit]


def test_cache_config_keeps_the_bytes_a_size_stands_for() -> None:
    assert CacheConfig(cache_bytes="2MiB").cache_bytes == 2 * 2**20
    assert CacheConfig(cache_bytes=4096).cache_bytes == 4096
