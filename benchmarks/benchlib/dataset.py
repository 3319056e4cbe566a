"""The generated data set: apps of Zipf-like sizes, their `$files` triples (COPYed), their objects (files on disk).

Objects are written straight into the directory `rclone serve s3` serves, as `<bucket>/<key>`, with
a chosen mtime, so a HEAD of each gives a known ETag (MD5 of the body) and Last-Modified. Some files
have no object (missing), some already carry `hash` and `lastModified` (prepopulated, as the demo
seed has), and a few location ids hold non-ASCII file names, as older uploads did.
"""

import collections
import dataclasses
import hashlib
import itertools
import os
import pathlib
import random
import time
import uuid

import psycopg

from s3_attrs_pipeline.instant.database import ensure_file_attrs
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, AttrSpec, json_text, value_md5
from s3_attrs_pipeline.instant.object_keys import object_key
from s3_attrs_pipeline.local.postgres import EXISTING_FILE_ATTRS

_FILE_ATTRS = {spec.label: spec for spec in EXISTING_FILE_ATTRS}
_NAMES = ["photo.png", "circle_red.jpg", "日本語.txt", "résumé.pdf", "данные.csv", "notes.md", "🎉.gif", "report.pdf"]
_CONTENT_TYPES = ["image/png", "image/jpeg", "text/plain", "application/pdf", "text/csv", "text/markdown", "image/gif"]
_MTIME_BASE = 1_600_000_000  # 2020-09-13; every object's mtime is a whole second after it
_OWNER = uuid.UUID("0000bea7-0000-4000-8000-00000000bea7")
_TRIPLE_COLUMNS = "app_id, entity_id, attr_id, value, value_md5, ea, eav, av, ave, vae, checked_data_type"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    files: int
    apps: int
    bucket: str = "instant-bench-files"
    missing_ratio: float = 0.01
    prepopulated_ratio: float = 0.02
    seed: int = 4
    partition_width: int = 2


@dataclasses.dataclass(frozen=True)
class Sample:
    """A file whose outcome is checked after a run: its key, and the values S3 should give."""

    app_id: str
    entity_id: str
    key: str
    in_s3: bool
    md5: str
    last_modified_ms: int


@dataclasses.dataclass
class Dataset:
    spec: DatasetSpec
    keys_path: pathlib.Path  # the keys of the files lacking `hash`, one a line: what every strategy HEADs
    files: int = 0
    objects: int = 0
    missing: int = 0
    prepopulated: int = 0
    pending: int = 0
    pending_in_s3: int = 0
    apps_with_files: int = 0
    largest_app_files: int = 0
    partitions_with_files: int = 0
    largest_partition: str = ""
    largest_partition_pending: int = 0
    triples: int = 0
    database_bytes: int = 0
    seconds: float = 0.0
    samples: list[Sample] = dataclasses.field(default_factory=list)
    one_key_per_directory: list[str] = dataclasses.field(default_factory=list)


def _triple_row(app_id: uuid.UUID, entity_id: uuid.UUID, spec: AttrSpec, value: str | int) -> tuple:
    flags = spec.triple_flags
    return (
        app_id, entity_id, spec.attr_id, json_text(value), value_md5(value),
        flags["ea"], flags["eav"], flags["av"], flags["ave"], flags["vae"], spec.checked_data_type,
    )


def _secondary_indexes(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """The indexes of `triples` that no constraint owns: dropped during the load, rebuilt after it."""
    return conn.execute(
        """SELECT indexname, indexdef FROM pg_indexes
           WHERE schemaname = 'public' AND tablename = 'triples'
             AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'triples'::regclass)
           ORDER BY indexname"""
    ).fetchall()


def generate(database_url: str, s3_root: pathlib.Path, work_dir: pathlib.Path, spec: DatasetSpec, say=print) -> Dataset:
    """Fill the database at `database_url` (InstantDB's schema, no files yet) and the bucket directory."""
    started = time.monotonic()
    rng = random.Random(spec.seed)
    dataset = Dataset(spec, keys_path=work_dir / "pending-keys.txt")
    app_ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(spec.apps)]
    # Zipf-like: the app of rank r holds a share proportional to 1/r.
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(spec.apps)))
    app_of_file = list(range(min(spec.apps, spec.files)))  # every app has at least one file
    app_of_file += rng.choices(range(spec.apps), cum_weights=cumulative, k=spec.files - len(app_of_file))
    rng.shuffle(app_of_file)  # files of one app are spread over the table, as years of uploads leave them

    bucket_dir = s3_root / spec.bucket
    bucket_dir.mkdir(parents=True, exist_ok=True)
    made_dirs: dict[pathlib.Path, str] = {}
    files_per_app: collections.Counter = collections.Counter()
    pending_per_partition: collections.Counter = collections.Counter()
    sample_every = max(1, spec.files // 200)
    non_ascii_samples = missing_samples = 0

    with psycopg.connect(database_url, autocommit=True) as conn, open(dataset.keys_path, "w", encoding="utf-8") as keys:
        ensure_file_attrs(conn)  # prepopulated files carry hash and lastModified triples
        conn.execute("INSERT INTO instant_users (id, email) VALUES (%s, %s)", (_OWNER, "bench@example.com"))
        with conn.cursor().copy("COPY apps (id, creator_id, title) FROM STDIN") as copy:
            for app_id in app_ids:
                copy.write_row((app_id, _OWNER, f"bench app {app_id.hex[:8]}"))
        indexes = _secondary_indexes(conn)
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        with conn.transaction():
            # The rows are consistent by construction: skip the per-row foreign key triggers.
            conn.execute("SET LOCAL session_replication_role = replica")
            with conn.cursor().copy(f"COPY triples ({_TRIPLE_COLUMNS}) FROM STDIN") as copy:
                for index, app_index in enumerate(app_of_file):
                    app_id = app_ids[app_index]
                    entity_id = uuid.UUID(int=rng.getrandbits(128), version=4)
                    name = rng.choice(_NAMES)
                    location_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                    if index % 97 == 5:
                        location_id = f"{location_id}-{name}"  # older uploads kept the file name in the key
                    key = object_key(app_id, location_id)
                    in_s3 = rng.random() >= spec.missing_ratio
                    prepopulated = in_s3 and rng.random() < spec.prepopulated_ratio
                    path = f"uploads/{index}/{name}"
                    body = f"{app_id}/{entity_id} {path}\n".encode() * rng.randint(1, 8)
                    mtime = _MTIME_BASE + rng.randrange(150_000_000)
                    md5 = hashlib.md5(body).hexdigest()
                    values = {
                        "id": str(entity_id),
                        "path": path,
                        "size": len(body),
                        "content-type": rng.choice(_CONTENT_TYPES),
                        "location-id": location_id,
                        "key-version": 1,
                    }
                    for label, value in values.items():
                        copy.write_row(_triple_row(app_id, entity_id, _FILE_ATTRS[label], value))
                    dataset.triples += len(values)
                    if prepopulated:
                        copy.write_row(_triple_row(app_id, entity_id, HASH, md5))
                        copy.write_row(_triple_row(app_id, entity_id, LAST_MODIFIED, mtime * 1000))
                        dataset.triples += 2
                        dataset.prepopulated += 1
                    else:
                        keys.write(key + "\n")
                        dataset.pending += 1
                        dataset.pending_in_s3 += in_s3
                        pending_per_partition[app_id.hex[: spec.partition_width]] += 1
                    if in_s3:
                        path_on_disk = bucket_dir / key
                        directory = path_on_disk.parent
                        if directory not in made_dirs:
                            directory.mkdir(parents=True, exist_ok=True)
                            made_dirs[directory] = key
                        fd = os.open(path_on_disk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        try:
                            os.write(fd, body)
                        finally:
                            os.close(fd)
                        os.utime(path_on_disk, (mtime, mtime))
                        dataset.objects += 1
                    else:
                        dataset.missing += 1
                    files_per_app[app_id] += 1
                    wanted = index % sample_every == 0
                    if not wanted and not key.isascii() and non_ascii_samples < 10:
                        wanted, non_ascii_samples = True, non_ascii_samples + 1
                    if not wanted and not in_s3 and missing_samples < 10:
                        wanted, missing_samples = True, missing_samples + 1
                    if wanted:
                        dataset.samples.append(Sample(str(app_id), str(entity_id), key, in_s3, md5, mtime * 1000))
                    dataset.files += 1
                    if dataset.files % 100_000 == 0:
                        say(f"  ... {dataset.files} files")
        say(f"  rows and objects written in {time.monotonic() - started:.1f} s; rebuilding {len(indexes)} indexes")
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("VACUUM (ANALYZE) triples")
        conn.execute("ANALYZE")
        dataset.database_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]

    dataset.apps_with_files = len(files_per_app)
    dataset.largest_app_files = max(files_per_app.values(), default=0)
    dataset.partitions_with_files = len(pending_per_partition)
    if pending_per_partition:
        dataset.largest_partition, dataset.largest_partition_pending = pending_per_partition.most_common(1)[0]
    dataset.one_key_per_directory = list(made_dirs.values())
    dataset.seconds = time.monotonic() - started
    return dataset


def load_keys(path: pathlib.Path | str) -> list[str]:
    return [key for key in pathlib.Path(path).read_text(encoding="utf-8").split("\n") if key]


def check_populated(database_url: str, dataset: Dataset) -> str:
    """After a complete run: are exactly the objects' files populated, with the sample's exact values?"""
    from s3_attrs_pipeline.instant.file_attrs import LOCATION_ID

    with psycopg.connect(database_url, autocommit=True) as conn:
        hashes, last_modifieds = conn.execute(
            "SELECT count(*) FILTER (WHERE attr_id = %s), count(*) FILTER (WHERE attr_id = %s) FROM triples "
            "WHERE attr_id IN (%s, %s)",
            (HASH.attr_id, LAST_MODIFIED.attr_id, HASH.attr_id, LAST_MODIFIED.attr_id),
        ).fetchone()
        expected = dataset.prepopulated + dataset.pending_in_s3
        wrong = []
        for sample in dataset.samples:
            row = conn.execute(
                """SELECT h.value #>> '{}', (m.value #>> '{}')::bigint FROM triples l
                   LEFT JOIN triples h ON h.app_id = l.app_id AND h.entity_id = l.entity_id AND h.attr_id = %s AND h.ea
                   LEFT JOIN triples m ON m.app_id = l.app_id AND m.entity_id = l.entity_id AND m.attr_id = %s AND m.ea
                   WHERE l.app_id = %s AND l.entity_id = %s AND l.attr_id = %s AND l.ea""",
                (HASH.attr_id, LAST_MODIFIED.attr_id, sample.app_id, sample.entity_id, LOCATION_ID.attr_id),
            ).fetchone()
            want = (sample.md5, sample.last_modified_ms) if sample.in_s3 else (None, None)
            if row is None or tuple(row) != want:
                wrong.append(f"{sample.key}: {row} != {want}")
    problems = []
    if (hashes, last_modifieds) != (expected, expected):
        problems.append(f"{hashes} hash and {last_modifieds} lastModified triples, expected {expected} of each")
    if wrong:
        problems.append(f"{len(wrong)} of {len(dataset.samples)} sampled files wrong, e.g. {wrong[0]}")
    if problems:
        return "WRONG: " + "; ".join(problems)
    return f"ok: {expected} files populated, {len(dataset.samples)} sampled files exact"
