"""The system catalog's `$files` attrs: `location-id` checked, `hash` and `lastModified` created
if missing and checked to be what InstantDB defines."""

import psycopg

from s3_attrs_pipeline.instant.file_attrs import (
    FILES_ETYPE,
    LOCATION_ID,
    NEW_ATTRS,
    SYSTEM_CATALOG_APP_ID,
    AttrSpec,
)


class CatalogMismatch(RuntimeError):
    """The system catalog's `$files` attrs are missing or not what InstantDB defines."""


_INSERT_ATTR = """
INSERT INTO attrs (id, app_id, value_type, cardinality, is_unique, is_indexed, forward_ident,
                   checked_data_type, is_required, etype, label)
VALUES (%(id)s, %(app_id)s, 'blob', 'one', %(is_unique)s, %(is_indexed)s, %(ident_id)s,
        %(checked_data_type)s::checked_data_type, %(is_required)s, %(etype)s, %(label)s)
ON CONFLICT DO NOTHING
"""

_INSERT_IDENT = """
INSERT INTO idents (id, app_id, attr_id, etype, label)
VALUES (%(ident_id)s, %(app_id)s, %(id)s, %(etype)s, %(label)s)
ON CONFLICT DO NOTHING
"""

_SELECT_ATTR = """
SELECT a.id, a.value_type, a.cardinality, a.is_unique, a.is_indexed, a.checked_data_type::text,
       a.forward_ident, i.id IS NOT NULL AS has_ident
FROM attrs a LEFT JOIN idents i ON i.id = a.forward_ident AND i.attr_id = a.id
WHERE a.app_id = %(app_id)s AND a.etype = %(etype)s AND a.label = %(label)s
"""


def _attr_params(spec: AttrSpec) -> dict:
    return {
        "id": spec.attr_id,
        "ident_id": spec.ident_id,
        "app_id": SYSTEM_CATALOG_APP_ID,
        "etype": FILES_ETYPE,
        "label": spec.label,
        "is_unique": spec.is_unique,
        "is_indexed": spec.is_indexed,
        "checked_data_type": spec.checked_data_type,
        "is_required": spec.is_required,
    }


def _check_attr(conn: psycopg.Connection, spec: AttrSpec, *, check_type: bool, require_ident: bool = True) -> None:
    row = conn.execute(_SELECT_ATTR, _attr_params(spec)).fetchone()
    where = f"attrs row {FILES_ETYPE}.{spec.label} of the system catalog app {SYSTEM_CATALOG_APP_ID}"
    if row is None:
        raise CatalogMismatch(f"{where} does not exist")
    attr_id, value_type, cardinality, is_unique, is_indexed, checked_data_type, forward_ident, has_ident = row
    expected = {
        "id": spec.attr_id,
        "value_type": "blob",
        "cardinality": "one",
        "is_unique": spec.is_unique,
        "is_indexed": spec.is_indexed,
        "forward_ident": spec.ident_id,
    }
    actual = {
        "id": attr_id,
        "value_type": value_type,
        "cardinality": cardinality,
        "is_unique": is_unique,
        "is_indexed": is_indexed,
        "forward_ident": forward_ident,
    }
    if check_type:
        expected["checked_data_type"] = spec.checked_data_type
        actual["checked_data_type"] = checked_data_type
    wrong = [
        f"{name} is {actual[name]!r}, expected {value!r}" for name, value in expected.items() if actual[name] != value
    ]
    if require_ident and not has_ident:
        wrong.append(f"its ident {spec.ident_id} is missing")
    if wrong:
        raise CatalogMismatch(f"{where} is not as InstantDB defines it: " + "; ".join(wrong))


def ensure_file_attrs(conn: psycopg.Connection) -> None:
    """Create `$files.hash` and `$files.lastModified` (attrs and idents) if missing, then check the
    catalog rows this pipeline relies on. Safe to run from many processes at once."""
    _check_attr(conn, LOCATION_ID, check_type=False)
    if not _new_attrs_exist(conn):
        _create_new_attrs(conn)
    for spec in NEW_ATTRS:
        _check_attr(conn, spec, check_type=True)


_COUNT_NEW_ATTRS = """
SELECT count(*) FROM attrs a JOIN idents i ON i.id = a.forward_ident AND i.attr_id = a.id
WHERE a.id = ANY(%(ids)s) AND a.app_id = %(app_id)s
"""


def _new_attrs_exist(conn: psycopg.Connection) -> bool:
    params = {"ids": [spec.attr_id for spec in NEW_ATTRS], "app_id": SYSTEM_CATALOG_APP_ID}
    return conn.execute(_COUNT_NEW_ATTRS, params).fetchone()[0] == len(NEW_ATTRS)


def _create_new_attrs(conn: psycopg.Connection) -> None:
    with conn.transaction():
        for spec in NEW_ATTRS:
            params = _attr_params(spec)
            conn.execute(_INSERT_ATTR, params)
            # Checked before the ident goes in: an attr of this label with another id would make the
            # ident insert fail with a bare foreign-key error.
            _check_attr(conn, spec, check_type=True, require_ident=False)
            conn.execute(_INSERT_IDENT, params)
