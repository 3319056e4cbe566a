"""Where a file's object lives in S3: `<app_id>/<bin>/<location-id>`."""

import uuid

_INT32_MIN = -(2**31)
_MAX_LOCATION_ID_LENGTH = 1024
_MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes


class InvalidLocationId(ValueError):
    """A `location-id` value that cannot name an S3 object safely."""


def java_string_hash_code(text: str) -> int:
    """`String.hashCode()` as the JVM computes it: over UTF-16 code units, wrapping at 32 bits."""
    utf16 = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(utf16), 2):
        h = (31 * h + int.from_bytes(utf16[i : i + 2], "big")) & 0xFFFFFFFF
    return h - 2**32 if h >= 2**31 else h


def location_bin(location_id: str) -> int:
    """`floorMod(abs(hashCode), 10)`; the JVM's abs leaves Integer.MIN_VALUE negative."""
    h = java_string_hash_code(location_id)
    magnitude = h if h == _INT32_MIN else abs(h)
    return magnitude % 10  # Python's % is a floor modulo, like Math.floorMod


def validated_location_id(value: object) -> str:
    """The `location-id` triple's JSON value if it is a safe single key segment, else InvalidLocationId."""
    if not isinstance(value, str):
        raise InvalidLocationId(f"location-id is a JSON {type(value).__name__}, not a string: {value!r:.80}")
    if not value:
        raise InvalidLocationId("location-id is an empty string")
    if len(value) > _MAX_LOCATION_ID_LENGTH:
        raise InvalidLocationId(f"location-id is {len(value)} characters long (at most {_MAX_LOCATION_ID_LENGTH})")
    if "/" in value or value in (".", ".."):
        raise InvalidLocationId(f"location-id {value!r:.80} is not a single key segment")
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
    """The location-id whose object key is `key` in this app, or None if no valid location-id has it
    (another app's key, a wrong bin, a nested path)."""
    location_id = key.rpartition("/")[2]
    try:
        return location_id if object_key(app_id, location_id) == key else None
    except InvalidLocationId:
        return None
