"""The schema facts' test vectors, and the pure parts of the InstantDB domain."""

import uuid

import pytest

from s3_attrs_pipeline.instant.app_id_ranges import (
    EVERY_APP,
    AppIdRange,
    partition_keys,
    partition_of_app,
    sixteenths,
)
from s3_attrs_pipeline.instant.file_attrs import FILE_ID, HASH, LAST_MODIFIED, LOCATION_ID, json_text, value_md5
from s3_attrs_pipeline.instant.object_keys import (
    InvalidLocationId,
    java_string_hash_code,
    location_bin,
    object_key,
    validated_location_id,
)
from s3_attrs_pipeline.instant.system_ids import encode_short_string, system_attr_id, system_ident_id
from s3_attrs_pipeline.local.postgres import EXISTING_FILE_ATTRS

ATTR_ID_VECTORS = {
    "id": "96653230-13ff-ffff-2a34-81ffffffffff",
    "path": "96653230-13ff-ffff-2a34-f04cffffffff",
    "location-id": "96653230-13ff-ffff-2a34-b40fffffffff",
    "url": "96653230-13ff-ffff-2a35-48afffffffff",
    "size": "96653230-13ff-ffff-2a35-24609fffffff",
    "hash": "96653230-13ff-ffff-2a34-7048ffffffff",
    "lastModified": "96653230-13ff-ffff-2a34-b04a6c70ffff",
}


@pytest.mark.parametrize("label,expected", ATTR_ID_VECTORS.items())
def test_attr_ids_match_the_schema_vectors(label, expected):
    specs = {spec.label: spec for spec in (*EXISTING_FILE_ATTRS, HASH, LAST_MODIFIED)}
    assert specs[label].attr_id == uuid.UUID(expected)
    assert specs[label].ident_id == uuid.UUID("96653231-03ff" + expected[len("96653230-13ff") :])


def test_new_attr_ids_come_from_their_label_codes():
    assert system_attr_id("fi", "hash") == HASH.attr_id
    assert system_ident_id("fi", "lastmod") == LAST_MODIFIED.ident_id
    assert LOCATION_ID.attr_id == uuid.UUID(ATTR_ID_VECTORS["location-id"])
    assert FILE_ID.attr_id == uuid.UUID(ATTR_ID_VECTORS["id"])


def test_short_strings_are_packed_five_bits_a_character_padded_with_ones():
    assert encode_short_string("") == 2**64 - 1
    assert encode_short_string("a") == int("00000" + "1" * 59, 2)
    assert encode_short_string("y") == int("11001" + "1" * 59, 2)  # 'z' comes before 'y'
    with pytest.raises(ValueError, match="longer than 12"):
        encode_short_string("abcdefghijklm")
    with pytest.raises(ValueError, match="not in the system id alphabet"):
        encode_short_string("A")


@pytest.mark.parametrize(
    "location_id,expected_bin",
    [
        ("circle_red.jpg", 5),
        ("photo.png", 1),
        ("日本語.txt", 3),
        ("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", 5),
        ("polygenelubricants", 2),
    ],
)
def test_bins_match_the_schema_vectors(location_id, expected_bin):
    assert location_bin(location_id) == expected_bin


def test_java_hash_code_wraps_and_min_value_keeps_its_sign():
    assert java_string_hash_code("polygenelubricants") == -(2**31)
    assert java_string_hash_code("") == 0
    assert java_string_hash_code("a") == 97
    assert java_string_hash_code("😀") == 31 * 0xD83D + 0xDE00  # two UTF-16 code units


def test_object_key_is_app_bin_location():
    app = uuid.UUID("6513270e-269e-4d37-b2a7-4de452e6b438")
    assert object_key(app, "photo.png") == "6513270e-269e-4d37-b2a7-4de452e6b438/1/photo.png"
    assert len(object_key(app, "é" * 492 + "x").encode()) == 1024  # é is two bytes in UTF-8
    with pytest.raises(InvalidLocationId, match="1025 bytes"):
        object_key(app, "é" * 493)


@pytest.mark.parametrize(
    "value,reason",
    [
        (42, "JSON int"),
        (None, "JSON NoneType"),
        ("", "empty"),
        ("..", "'.' or '..' segment"),
        (".", "'.' or '..' segment"),
        ("a/../b", "'.' or '..' segment"),
        ("photos/./cat.jpg", "'.' or '..' segment"),
        ("bad\nname", "control characters"),
        ("a/b\x7f", "control characters"),
        ("\ud800", "not valid Unicode"),
    ],
)
def test_unsafe_location_ids_are_rejected_with_the_reason(value, reason):
    with pytest.raises(InvalidLocationId, match=reason):
        validated_location_id(value)


@pytest.mark.parametrize(
    "value", ["a/b", "photos/2024/猫 cat.jpg", "a//b", "/leading", "trailing/", "..hidden/.x", "x" * 900]
)
def test_every_location_id_the_server_would_key_is_accepted(value):
    assert validated_location_id(value) == value
    app = uuid.UUID("6513270e-269e-4d37-b2a7-4de452e6b438")
    assert object_key(app, value) == f"{app}/{location_bin(value)}/{value}"


def test_value_md5_is_md5_of_the_jsonb_text():
    # md5('"abc"'): the quotes are part of the jsonb text form.
    assert value_md5("abc") == "ebd9f4c7b06cb0aaf5d13d80e49d8b90"
    assert value_md5(1704067200000) == "b9d7e097ffa7146542bd4acb70db132d"
    assert json_text("日本") == '"日本"'
    assert json_text('a"b\\c\n') == '"a\\"b\\\\c\\n"'
    with pytest.raises(TypeError):
        json_text(True)


def test_partition_keys_and_app_ranges():
    keys = partition_keys(2)
    assert len(keys) == 256 and keys[0] == "00" and keys[-1] == "ff"
    assert partition_keys(1) == list("0123456789abcdef")
    app_range = AppIdRange.for_partition("3f")
    assert app_range.first == uuid.UUID("3f000000-0000-0000-0000-000000000000")
    assert app_range.last == uuid.UUID("3fffffff-ffff-ffff-ffff-ffffffffffff")
    assert partition_of_app(uuid.UUID("3f123456-0000-0000-0000-000000000000"), 2) == "3f"
    with pytest.raises(ValueError, match="partition width"):
        partition_keys(0)
    with pytest.raises(ValueError, match="lowercase hex"):
        AppIdRange.for_partition("3G")


def test_a_runs_range_spans_its_keys_and_a_whole_database_count_is_sixteen_statements():
    run = AppIdRange.spanning(["41", "3f", "40"])
    assert (run.first, run.last) == (AppIdRange.for_partition("3f").first, AppIdRange.for_partition("41").last)
    assert AppIdRange.spanning(["3f"]) == AppIdRange.for_partition("3f")
    every = sixteenths(EVERY_APP)
    assert [piece.key for piece in every] == list("0123456789abcdef")
    assert every[0].first == EVERY_APP.first and every[-1].last == EVERY_APP.last
    assert all(a.last.int + 1 == b.first.int for a, b in zip(every, every[1:], strict=False))
    assert sixteenths(AppIdRange.for_partition("3f")) == [
        AppIdRange("3", run.first, AppIdRange.for_partition("3f").last)
    ]
    assert [(p.first, p.last) for p in sixteenths(run)] == [
        (run.first, AppIdRange.for_partition("3").last),
        (AppIdRange.for_partition("4").first, run.last),
    ]
