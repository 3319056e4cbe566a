"""Where a file's object lives in S3: `<app_id>/<bin>/<location-id>`."""

import array
import sys
import uuid

_INT32_MIN = -(2**31)
_MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes
_UTF16_NATIVE = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"  # array("H")'s byte order


class InvalidLocationId(ValueError):
    """A `location-id` value that cannot name an S3 object safely."""


def java_string_hash_code(text: str) -> int:
    """`String.hashCode()` as the JVM computes it: over UTF-16 code units, wrapping at 32 bits."""
    h = 0
    # The code units as machine ints, read in one step: slicing the bytes two at a time cost ~30 µs a
    # key, a twentieth of a file's CPU.
    for unit in array.array("H", text.encode(_UTF16_NATIVE)):
        h = (31 * h + unit) & 0xFFFFFFFF
    return h - 2**32 if h >= 2**31 else h


def location_bin(location_id: str) -> int:
    """`floorMod(abs(hashCode), 10)`; the JVM's abs leaves Integer.MIN_VALUE negative."""
    h = java_string_hash_code(location_id)
    magnitude = h if h == _INT32_MIN else abs(h)
    return magnitude % 10  # Python's % is a floor modulo, like Math.floorMod


def validated_location_id(value: object) -> str:
    """The `location-id` triple's JSON value if it can name an object safely, else InvalidLocationId.

    InstantDB's server keys an object `<app_id>/<bin>/<location-id>` for any location-id string, so
    nested paths and any Unicode text are accepted. Refused: what is not a string or is empty, a
    `.` or `..` segment (a client or proxy may resolve it to another key), control characters, and
    text that is not valid Unicode; `object_key` also refuses a key over S3's 1,024 bytes."""
    if not isinstance(value, str):
        raise InvalidLocationId(f"location-id is a JSON {type(value).__name__}, not a string: {value!r:.80}")
    if not value:
        raise InvalidLocationId("location-id is an empty string")
    if any(segment in (".", "..") for segment in value.split("/")):
        raise InvalidLocationId(f"location-id {value!r:.80} has a '.' or '..' segment")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise InvalidLocationId(f"location-id {value!r:.80} contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidLocationId(f"location-id {value!r:.80} is not valid Unicode text") from error
    return value


def object_key(app_id: uuid.UUID, location_id: object) -> str:
    location_id = validated_location_id(location_id)
    key = f"{app_id}/{location_bin(location_id)}/{location_id}"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise InvalidLocationId(
            f"location-id {location_id[:40]!r}... makes an object key of {len(key.encode())} bytes "
            f"(S3 allows {_MAX_KEY_BYTES})"
        )
    return key


def location_id_of_key(app_id: uuid.UUID, key: str) -> str | None:
    """The location-id whose object key is `key` in this app: `<app_id>/<bin>/<a>/<b>` is `a/b` when
    `<bin>` is that location-id's bin. None if no valid location-id has it (another app's key, a
    wrong bin)."""
    prefix = f"{app_id}/"
    if not key.startswith(prefix):
        return None
    _, slash, location_id = key[len(prefix) :].partition("/")
    if not slash:
        return None
    try:
        return location_id if object_key(app_id, location_id) == key else None
    except InvalidLocationId:
        return None
