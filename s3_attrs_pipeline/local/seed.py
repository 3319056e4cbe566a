"""A realistic data set: apps of skewed sizes, their `$files` triples, and their S3 objects.

Some files have no object (orphans), some objects are multipart uploads, some files already carry
`hash` and `lastModified`, and paths and location ids include non-ASCII text.
"""

import dataclasses
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg

from s3_attrs_pipeline.instant.catalog import ensure_file_attrs
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, AttrSpec, json_text, value_md5
from s3_attrs_pipeline.instant.object_keys import object_key
from s3_attrs_pipeline.local.postgres import EXISTING_FILE_ATTRS
from s3_attrs_pipeline.s3.object_metadata import object_metadata_from_headers

_FILE_ATTRS = {spec.label: spec for spec in EXISTING_FILE_ATTRS}
_NAMES = ["photo.png", "circle_red.jpg", "日本語.txt", "résumé.pdf", "данные.csv", "notes.md", "🎉.gif", "report.pdf"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    apps: int = 12
    files: int = 3000
    missing_ratio: float = 0.03
    multipart_ratio: float = 0.05
    prepopulated_ratio: float = 0.05
    seed: int = 7


@dataclasses.dataclass(frozen=True)
class SeededFile:
    app_id: uuid.UUID
    entity_id: uuid.UUID
    location_id: str
    path: str
    in_s3: bool
    multipart: bool
    prepopulated: bool

    @property
    def key(self) -> str:
        return object_key(self.app_id, self.location_id)


def plan_dataset(spec: DatasetSpec) -> list[SeededFile]:
    """The files of `spec`, the same every time for the same seed. App sizes follow a Zipf-like law."""
    rng = random.Random(spec.seed)
    app_ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(spec.apps)]
    weights = [1 / (rank + 1) for rank in range(spec.apps)]
    files = []
    for index in range(spec.files):
        app_id = app_ids[index] if index < spec.apps else rng.choices(app_ids, weights)[0]
        name = rng.choice(_NAMES)
        location_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if index % 97 == 5:
            location_id = f"{location_id}-{name}"  # older uploads kept the file name in the key
        elif index % 89 == 7:
            location_id = f"imports/{index % 3}/{location_id}/{name}"  # a nested path: the server keys any string
        in_s3 = rng.random() >= spec.missing_ratio
        files.append(
            SeededFile(
                app_id=app_id,
                entity_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                location_id=location_id,
                path=f"uploads/{index}/{name}",
                in_s3=in_s3,
                multipart=in_s3 and rng.random() < spec.multipart_ratio,
                prepopulated=in_s3 and rng.random() < spec.prepopulated_ratio,
            )
        )
    return files


def _triple_row(app_id: uuid.UUID, entity_id: uuid.UUID, spec: AttrSpec, value: str | int) -> tuple:
    flags = spec.triple_flags
    return (
        app_id,
        entity_id,
        spec.attr_id,
        json_text(value),
        value_md5(value),
        flags["ea"],
        flags["eav"],
        flags["av"],
        flags["ave"],
        flags["vae"],
        spec.checked_data_type,
    )


_INSERT_TRIPLE = """
INSERT INTO triples (app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type)
VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s::checked_data_type)
"""


def _file_triples(file: SeededFile, size: int) -> list[tuple]:
    values = {
        "id": str(file.entity_id),
        "path": file.path,
        "size": size,
        "content-type": "application/octet-stream",
        "location-id": file.location_id,
        "key-version": 1,
    }
    return [_triple_row(file.app_id, file.entity_id, _FILE_ATTRS[label], v) for label, v in values.items()]


def _body(file: SeededFile) -> bytes:
    return f"{file.path} {file.entity_id}\n".encode() * 3


def upload_objects(s3_client, bucket: str, files: list[SeededFile]) -> None:
    """Create the bucket if needed and upload the objects of the files that have one."""
    existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3_client.create_bucket(Bucket=bucket)

    def upload(file: SeededFile) -> None:
        if not file.multipart:
            s3_client.put_object(Bucket=bucket, Key=file.key, Body=_body(file))
            return
        upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=file.key)["UploadId"]
        parts = []
        for number in (1, 2):
            etag = s3_client.upload_part(
                Bucket=bucket, Key=file.key, UploadId=upload_id, PartNumber=number, Body=_body(file)
            )["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
        s3_client.complete_multipart_upload(
            Bucket=bucket, Key=file.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, [f for f in files if f.in_s3]))


def insert_files(conn: psycopg.Connection, s3_client, bucket: str, files: list[SeededFile]) -> None:
    """Insert the apps and `$files` triples; prepopulated files also get `hash` and `lastModified`,
    with the values a HEAD of their object gives now."""
    if any(file.prepopulated for file in files):
        ensure_file_attrs(conn)
    with conn.transaction():
        owner = uuid.UUID(int=0x5EED, version=4)
        conn.execute(
            "INSERT INTO instant_users (id, email) VALUES (%s, %s) ON CONFLICT DO NOTHING", (owner, "seed@example.com")
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO apps (id, creator_id, title) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(app_id, owner, f"app {app_id.hex[:6]}") for app_id in sorted({f.app_id for f in files})],
            )
            rows = [row for file in files for row in _file_triples(file, len(_body(file)))]
            for file in files:
                if file.prepopulated:
                    headers = s3_client.head_object(Bucket=bucket, Key=file.key)["ResponseMetadata"]["HTTPHeaders"]
                    metadata = object_metadata_from_headers(headers)
                    rows.append(_triple_row(file.app_id, file.entity_id, HASH, metadata.hash))
                    rows.append(_triple_row(file.app_id, file.entity_id, LAST_MODIFIED, metadata.last_modified_ms))
            cur.executemany(_INSERT_TRIPLE, rows)


def database_is_seeded(conn: psycopg.Connection) -> bool:
    location_attr = _FILE_ATTRS["location-id"].attr_id
    return conn.execute("SELECT EXISTS (SELECT 1 FROM triples WHERE attr_id = %s)", (location_attr,)).fetchone()[0]
