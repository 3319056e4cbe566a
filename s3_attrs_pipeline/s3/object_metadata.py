"""An object's metadata as the pipeline stores it: the ETag unquoted, Last-Modified in epoch ms,
read from the headers S3 sends and refused when they are not what S3 sends."""

import dataclasses
import email.utils
import re

# Printable ASCII without quotes or spaces: what S3 and its look-alikes put inside an ETag.
_ETAG_PATTERN = re.compile(r"[!#-~]{1,512}")


class MalformedObjectMetadata(ValueError):
    """An object's ETag or Last-Modified header is not what S3 sends."""


@dataclasses.dataclass(frozen=True)
class ObjectMetadata:
    hash: str  # the ETag without its quotes
    last_modified_ms: int


def parse_etag(header: str | None) -> str:
    if header is None:
        raise MalformedObjectMetadata("the response has no ETag header")
    unquoted = header[1:-1] if len(header) >= 2 and header[0] == header[-1] == '"' else header
    if not _ETAG_PATTERN.fullmatch(unquoted):
        raise MalformedObjectMetadata(f"ETag {header[:80]!r} is not a quoted printable token")
    return unquoted


def parse_last_modified_ms(header: str | None) -> int:
    if header is None:
        raise MalformedObjectMetadata("the response has no Last-Modified header")
    try:
        instant = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        instant = None
    if instant is None or instant.tzinfo is None:
        raise MalformedObjectMetadata(f"Last-Modified {header[:80]!r} is not an HTTP date")
    millis = round(instant.timestamp() * 1000)
    if millis <= 0:
        raise MalformedObjectMetadata(f"Last-Modified {header[:80]!r} is not after 1970")
    return millis


def object_metadata_from_headers(headers: dict[str, str]) -> ObjectMetadata:
    """Metadata from a HEAD's raw headers (lower-case names), as S3 sent them."""
    return ObjectMetadata(parse_etag(headers.get("etag")), parse_last_modified_ms(headers.get("last-modified")))
