"""The generated data set: apps of Zipf sizes, their `$files` triples (COPYed), their objects (files on disk).

Objects are written straight into the directory `rclone serve s3` serves, as `<bucket>/<key>`, with
a chosen mtime that has a fraction of a second (as real uploads do): a HEAD gives its whole second
(an HTTP date), a listing its milliseconds, and the pipeline must write the same value either way.
Some files have no object (missing), some already carry `hash` and `lastModified` (prepopulated, as
the demo seed has), and a few location ids hold non-ASCII file names, as older uploads did.

What a HEAD of each file's object answers (or that it is missing) is also loaded into the table
`bench_expected` of the same database, so a run's every written value can be checked with one join.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import pathlib
import random
import time
import uuid

import psycopg

from s3_attrs_pipeline.instant import file_attrs, reads
from s3_attrs_pipeline.instant.catalog import ensure_file_attrs
from s3_attrs_pipeline.instant.file_attrs import HASH, LAST_MODIFIED, AttrSpec, json_text, value_md5
from s3_attrs_pipeline.instant.object_keys import object_key
from s3_attrs_pipeline.local.postgres import EXISTING_FILE_ATTRS

_FILE_ATTRS = {spec.label: spec for spec in EXISTING_FILE_ATTRS}
_NAMES = ["photo.png", "circle_red.jpg", "日本語.txt", "résumé.pdf", "данные.csv", "notes.md", "🎉.gif", "report.pdf"]
_CONTENT_TYPES = ["image/png", "image/jpeg", "text/plain", "application/pdf", "text/csv", "text/markdown", "image/gif"]
_MTIME_BASE = 1_600_000_000  # 2020-09-13; every object's mtime is after it, with a fraction of a second
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
    list_threshold: int = 1000  # the pipeline's default: which apps it lists


def default_apps(files: int) -> int:
    """Apps of a data set of `files` files: on average 800 files an app, and at least 8. With Zipf sizes
    this gives 1 app of 1,000+ files at 3k files, 3 at 10k, 17 at 100k and ~125 at 1M."""
    return max(8, files // 800)


def zipf_sizes(files: int, apps: int) -> list[int]:
    """Files per app, largest first: the app of rank r holds a share proportional to 1/r (Zipf, s = 1),
    rounded to whole files (largest remainders), every app at least one file. Deterministic, so a
    given --files always has the same number of big apps."""
    apps = min(apps, files)
    weights = [1.0 / rank for rank in range(1, apps + 1)]
    spare = files - apps
    total = sum(weights)
    exact = [spare * w / total for w in weights]
    sizes = [1 + int(x) for x in exact]
    by_remainder = sorted(range(apps), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder[: files - sum(sizes)]:
        sizes[i] += 1
    return sizes


@dataclasses.dataclass(frozen=True)
class Sample:
    """A file whose outcome is checked after a run: its key, and the values S3 should give."""

    app_id: str
    entity_id: str
    key: str
    in_s3: bool
    md5: str
    last_modified_ms: int  # what a HEAD gives: the mtime's whole second


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
    smallest_partition: str = ""  # of those with work: EXPLAIN compares the two
    smallest_partition_pending: int = 0
    median_partition: str = ""  # of those with work, by files to do
    median_partition_pending: int = 0
    # The apps the pipeline lists with its default threshold (backfill.apps_to_list), and where they are.
    listed_apps: list[str] = dataclasses.field(default_factory=list)
    listed_apps_files: int = 0  # their files lacking hash
    listed_apps_partitions: list[str] = dataclasses.field(default_factory=list)
    apps_of_1000_files: int = 0
    triples: int = 0
    database_bytes: int = 0
    seconds: float = 0.0
    samples: list[Sample] = dataclasses.field(default_factory=list)
    one_key_per_directory: list[str] = dataclasses.field(default_factory=list)


@functools.cache
def _spec_columns(spec: AttrSpec) -> tuple[uuid.UUID, tuple]:
    """(attr id, flags and checked type) of a spec: computed once, not per row (system ids are hashes)."""
    flags = spec.triple_flags
    return spec.attr_id, (flags["ea"], flags["eav"], flags["av"], flags["ave"], flags["vae"], spec.checked_data_type)


def _triple_row(app_id: uuid.UUID, entity_id: uuid.UUID, spec: AttrSpec, value: str | int) -> tuple:
    attr_id, rest = _spec_columns(spec)
    return (app_id, entity_id, attr_id, json_text(value), value_md5(value)) + rest


def _write_objects(objects: list[tuple[pathlib.Path, bytes, int]]) -> None:
    """Create each object's file with its body and mtime (run on a writer thread: the system calls release the GIL)."""
    for path, body, mtime_ns in objects:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)


class _ObjectWriter:
    """Writes objects on a few threads, in chunks, at most a few chunks behind the generator."""

    CHUNK = 512

    def __init__(self, threads: int = 4):
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="object-writer")
        self._chunk: list = []
        self._pending: collections.deque = collections.deque()
        self._limit = threads * 4

    def add(self, path: pathlib.Path, body: bytes, mtime_ns: int) -> None:
        self._chunk.append((path, body, mtime_ns))
        if len(self._chunk) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._chunk:
            self._pending.append(self._pool.submit(_write_objects, self._chunk))
            self._chunk = []
        while len(self._pending) > self._limit:
            self._pending.popleft().result()

    def close(self) -> None:
        self._flush()
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()


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
    sizes = zipf_sizes(spec.files, spec.apps)
    app_of_file = [app for app, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(app_of_file)  # files of one app are spread over the table, as years of uploads leave them

    bucket_dir = s3_root / spec.bucket
    bucket_dir.mkdir(parents=True, exist_ok=True)
    made_dirs: dict[pathlib.Path, str] = {}
    files_per_app: collections.Counter = collections.Counter()
    prepopulated_per_app: collections.Counter = collections.Counter()
    pending_per_partition: collections.Counter = collections.Counter()
    sample_every = max(1, spec.files // 200)
    non_ascii_samples = missing_samples = 0

    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as expected_conn,
        open(dataset.keys_path, "w", encoding="utf-8") as keys,
    ):
        expected_conn.execute(
            "CREATE TABLE bench_expected (app_id uuid, entity_id uuid, md5 text, last_modified_ms bigint, in_s3 bool)"
        )
        expected_copy_cm = expected_conn.cursor().copy("COPY bench_expected FROM STDIN")
        expected_copy = expected_copy_cm.__enter__()
        writer = _ObjectWriter()
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
                    mtime = _MTIME_BASE + rng.randrange(150_000_000)  # whole seconds: what a HEAD gives
                    mtime_ns = mtime * 1_000_000_000 + rng.randrange(1_000_000_000)  # what the file has
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
                        prepopulated_per_app[app_id] += 1
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
                        writer.add(path_on_disk, body, mtime_ns)
                        dataset.objects += 1
                    else:
                        dataset.missing += 1
                    files_per_app[app_id] += 1
                    expected_copy.write_row((app_id, entity_id, md5, mtime * 1000, in_s3))
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
        writer.close()
        expected_copy_cm.__exit__(None, None, None)
        expected_conn.execute("CREATE INDEX ON bench_expected (app_id, entity_id)")
        expected_conn.execute("ANALYZE bench_expected")
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
        dataset.smallest_partition, dataset.smallest_partition_pending = pending_per_partition.most_common()[-1]
        ranked = pending_per_partition.most_common()
        dataset.median_partition, dataset.median_partition_pending = ranked[len(ranked) // 2]
    from s3_attrs_pipeline.tasks.listed_apps import apps_to_list

    counts = [
        reads.AppFileCount(app_id, files_per_app[app_id], prepopulated_per_app[app_id])
        for app_id in sorted(files_per_app)
    ]
    listed = apps_to_list(counts, spec.list_threshold)
    dataset.listed_apps = [str(app.app_id) for app in listed]
    dataset.listed_apps_files = sum(app.pending for app in listed)
    dataset.listed_apps_partitions = sorted({app.app_id.hex[: spec.partition_width] for app in listed})
    dataset.apps_of_1000_files = sum(1 for n in files_per_app.values() if n >= 1000)
    dataset.one_key_per_directory = list(made_dirs.values())
    dataset.seconds = time.monotonic() - started
    return dataset


def keep_only_apps(database_url: str, app_ids: list[str]) -> None:
    """Delete the `$files` triples of every app but `app_ids` (a copy of the template for the runs that
    measure the listed apps alone), and their expected values."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM triples WHERE app_id <> ALL(%s::uuid[]) AND app_id <> %s",
            (app_ids, file_attrs.SYSTEM_CATALOG_APP_ID),
        )
        conn.execute("DELETE FROM bench_expected WHERE app_id <> ALL(%s::uuid[])", (app_ids,))
        conn.execute("VACUUM (ANALYZE) triples")
        conn.execute("ANALYZE bench_expected")


def load_keys(path: pathlib.Path | str) -> list[str]:
    return [key for key in pathlib.Path(path).read_text(encoding="utf-8").split("\n") if key]


_CHECK_POPULATED = """
SELECT count(*) FILTER (WHERE e.in_s3),
       count(*) FILTER (WHERE e.in_s3 AND h.value #>> '{}' = e.md5 AND (m.value #>> '{}')::bigint = e.last_modified_ms),
       count(*) FILTER (WHERE e.in_s3 AND h.entity_id IS NULL AND m.entity_id IS NULL),
       count(*) FILTER (WHERE e.in_s3 AND (h.entity_id IS NULL) <> (m.entity_id IS NULL)),
       count(*) FILTER (WHERE e.in_s3 AND h.entity_id IS NOT NULL AND m.entity_id IS NOT NULL
                        AND NOT (h.value #>> '{}' = e.md5 AND (m.value #>> '{}')::bigint = e.last_modified_ms)),
       count(*) FILTER (WHERE NOT e.in_s3 AND (h.entity_id IS NOT NULL OR m.entity_id IS NOT NULL)),
       (array_agg(format('%%s/%%s: hash %%s lastModified %%s, expected %%s %%s', e.app_id, e.entity_id, h.value, m.value,
                         e.md5, e.last_modified_ms))
          FILTER (WHERE e.in_s3 AND h.entity_id IS NOT NULL
                  AND NOT (h.value #>> '{}' = e.md5 AND coalesce((m.value #>> '{}')::bigint = e.last_modified_ms, false))))[1]
FROM bench_expected e
LEFT JOIN triples h ON h.app_id = e.app_id AND h.entity_id = e.entity_id AND h.attr_id = %(hash)s AND h.ea
LEFT JOIN triples m ON m.app_id = e.app_id AND m.entity_id = e.entity_id AND m.attr_id = %(last_modified)s AND m.ea
"""


def check_populated(database_url: str) -> str:
    """After a complete run: has every file with an object exactly the values a HEAD of it gives (ETag
    unquoted, Last-Modified's whole second in ms), and no file without one any triple? Every file is
    checked, with one join against `bench_expected`."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        in_s3, exact, lacking, half, wrong, phantom, example = conn.execute(
            _CHECK_POPULATED, {"hash": HASH.attr_id, "last_modified": LAST_MODIFIED.attr_id}
        ).fetchone()
    problems = []
    if lacking:
        problems.append(f"{lacking} files with an object got no triples")
    if half:
        problems.append(f"{half} files got only one of the two triples")
    if wrong:
        problems.append(f"{wrong} files have values other than HEAD's, e.g. {example}")
    if phantom:
        problems.append(f"{phantom} files without an object got triples")
    if problems:
        return "WRONG: " + "; ".join(problems)
    return f"ok: all {exact} files with an object have HEAD's exact values, no file without one has a triple"
