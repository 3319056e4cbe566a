"""Partitions of the file population by the leading hex digits of the app id.

A partition is one contiguous range of app ids, so it is one index range in Postgres and one
contiguous range of S3 keys (`<app_id>/...`).
"""

import dataclasses
import itertools
import uuid

_HEX_DIGITS = "0123456789abcdef"
_UUID_HEX_DIGITS = 32
MAX_PARTITION_WIDTH = 4


def partition_keys(width: int) -> list[str]:
    """Every partition key of `width` hex digits, in order: '00', '01', ..., 'ff' for width 2."""
    if not 1 <= width <= MAX_PARTITION_WIDTH:
        raise ValueError(f"partition width must be 1 to {MAX_PARTITION_WIDTH} hex digits, not {width}")
    return ["".join(digits) for digits in itertools.product(_HEX_DIGITS, repeat=width)]


@dataclasses.dataclass(frozen=True)
class AppIdRange:
    """The apps whose id starts with `key`: first <= app_id <= last."""

    key: str
    first: uuid.UUID
    last: uuid.UUID

    @classmethod
    def for_partition(cls, key: str) -> "AppIdRange":
        if not 1 <= len(key) <= MAX_PARTITION_WIDTH or any(c not in _HEX_DIGITS for c in key):
            raise ValueError(f"partition key {key!r} is not 1 to {MAX_PARTITION_WIDTH} lowercase hex digits")
        padding = _UUID_HEX_DIGITS - len(key)
        return cls(key, uuid.UUID(key + "0" * padding), uuid.UUID(key + "f" * padding))

    @classmethod
    def spanning(cls, keys: list[str]) -> "AppIdRange":
        """The apps of every partition from the first of `keys` to the last (in key order): what a
        run over them reads, so that a one-partition run does not count the whole database."""
        first, last = cls.for_partition(min(keys)), cls.for_partition(max(keys))
        return cls(first.key if first == last else f"{first.key}..{last.key}", first.first, last.last)


# Every app: what the whole-database counts (stats, the checks) read.
EVERY_APP = AppIdRange("", uuid.UUID(int=0), uuid.UUID(int=2**128 - 1))


def sixteenths(app_ids: AppIdRange) -> list[AppIdRange]:
    """`app_ids` cut where the app id's first hex digit changes: at most a sixteenth of the apps each,
    so that a count over the whole database is statements that each stay within a session's
    statement timeout at ten times the size that one statement could count."""
    first, last = _HEX_DIGITS.index(app_ids.first.hex[0]), _HEX_DIGITS.index(app_ids.last.hex[0])
    pieces = [AppIdRange.for_partition(digit) for digit in _HEX_DIGITS[first : last + 1]]
    return [AppIdRange(piece.key, max(piece.first, app_ids.first), min(piece.last, app_ids.last)) for piece in pieces]


def partition_of_app(app_id: uuid.UUID, width: int) -> str:
    return app_id.hex[:width]
