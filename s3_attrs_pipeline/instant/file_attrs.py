"""The `$files` attributes this pipeline reads or writes, and how their triples are encoded."""

import dataclasses
import hashlib
import json
import uuid

from s3_attrs_pipeline.instant.system_ids import system_attr_id, system_ident_id

SYSTEM_CATALOG_APP_ID = uuid.UUID("a1111111-1111-1111-1111-111111111ca7")
SYSTEM_CATALOG_OWNER_ID = uuid.UUID("e1111111-1111-1111-1111-111111111ca7")
FILES_ETYPE = "$files"
FILES_ETYPE_CODE = "fi"


@dataclasses.dataclass(frozen=True)
class AttrSpec:
    """A `$files` blob attribute of cardinality one, as the system catalog defines it."""

    label: str
    label_code: str
    is_unique: bool
    is_indexed: bool
    checked_data_type: str | None
    is_required: bool = False

    @property
    def attr_id(self) -> uuid.UUID:
        return system_attr_id(FILES_ETYPE_CODE, self.label_code)

    @property
    def ident_id(self) -> uuid.UUID:
        return system_ident_id(FILES_ETYPE_CODE, self.label_code)

    @property
    def triple_flags(self) -> dict[str, bool]:
        """The index flags InstantDB derives from the attr: ea for cardinality one, eav/vae for refs."""
        return {"ea": True, "eav": False, "av": self.is_unique, "ave": self.is_indexed, "vae": False}


FILE_ID = AttrSpec("id", "id", is_unique=True, is_indexed=True, checked_data_type=None)
LOCATION_ID = AttrSpec(
    "location-id", "lid", is_unique=True, is_indexed=True, checked_data_type="string", is_required=True
)
HASH = AttrSpec("hash", "hash", is_unique=False, is_indexed=True, checked_data_type="string")
LAST_MODIFIED = AttrSpec("lastModified", "lastmod", is_unique=False, is_indexed=True, checked_data_type="number")

NEW_ATTRS = (HASH, LAST_MODIFIED)


def json_text(value: str | int) -> str:
    """The text Postgres prints for `value::jsonb`, for the strings and integers this pipeline writes."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"only strings and integers are written as triple values, not {value!r}")
    # Postgres escapes exactly what json.dumps escapes when non-ASCII is kept as is.
    return json.dumps(value, ensure_ascii=False)


def value_md5(value: str | int) -> str:
    """`md5(value::text)` of the jsonb value, as InstantDB stores it in `triples.value_md5`."""
    return md5_of_json_text(json_text(value))


def md5_of_json_text(text: str) -> str:
    """`value_md5` of the value whose `json_text` is `text`."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()
