"""moto's S3 server, run as a child process on loopback: a real S3 HTTP endpoint for the demo and tests."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _answers(endpoint_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint_url}/moto-api/", timeout=1):
            return True
    except OSError:
        return False


def start_s3_server(port: int | None = None, *, log_path: pathlib.Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's server; returns the process and its endpoint URL once it answers."""
    port = port or free_port()
    endpoint_url = f"http://{LOOPBACK}:{port}"
    env = os.environ | {
        "S3_UPLOAD_PART_MIN_SIZE": "1",  # small multipart uploads for the seed
        # moto keeps a body in memory up to this size, by default the part minimum less 1 KiB: with the
        # minimum at 1 byte every object would hold an open temporary file, and a session of tens of
        # thousands of objects would run out of file descriptors (moto then answers 500 to everything).
        "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(16 * 1024 * 1024),
    }
    # The server writes to its own copy of the log's descriptor: this process closes its one at once.
    with open(log_path, "ab") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # survives the demo command that started it
        )
    deadline = time.monotonic() + 30
    while not _answers(endpoint_url):
        if process.poll() is not None:
            raise RuntimeError(f"moto's S3 server exited with code {process.returncode} (log: {log_path})")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto's S3 server did not answer on {endpoint_url} within 30 s")
        time.sleep(0.1)
    return process, endpoint_url


def stop_s3_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def ensure_background_s3_server(state_file: pathlib.Path) -> tuple[str, bool]:
    """Reuse the server recorded in `state_file` if it still answers, else start one that outlives
    this process. Returns its endpoint URL and whether it was just started (and so is empty)."""
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        state = json.loads(state_file.read_text())
        if _answers(state["endpoint_url"]):
            return state["endpoint_url"], False
    process, endpoint_url = start_s3_server(log_path=state_file.with_suffix(".log"))
    state_file.write_text(json.dumps({"pid": process.pid, "endpoint_url": endpoint_url}))
    return endpoint_url, True


def stop_background_s3_server(state_file: pathlib.Path) -> bool:
    try:
        pid = json.loads(state_file.read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    state_file.unlink()
    return True
