"""What an operator sees of a run from the command line: a status line redrawn in place on a terminal
(partitions and files done of their totals, files/s, ETA, failures so far, or what the run waits
for), a plain line now and then when the output is not a terminal, one line per failed or stopped
partition, and a summary table at the end.

Per-file problems are not shown here: they are in the run's log (and on the console with --verbose).
"""

import time
from typing import TextIO

from s3_attrs_pipeline.runs.range_run import Ended, PartitionOutcome, Plan, RangeSettings

REDRAW_INTERVAL_S = 0.2  # on a terminal
PLAIN_INTERVAL_S = 10.0  # elsewhere: a log file or CI keeps a line per interval, not a redraw per batch


class ProgressDisplay:
    """A range_run.Listener that draws to `out`. `live`: redraw a status line in place; else
    print a plain line every PLAIN_INTERVAL_S; `quiet`: neither, only failures and the summary;
    `verbose`: also a line per partition with its counts."""

    def __init__(
        self,
        out: TextIO,
        counts_type: type,
        summary: tuple[str, ...],
        *,
        live: bool,
        quiet: bool = False,
        verbose: bool = False,
    ):
        self._out = out
        self._verbose = verbose
        self._counts_type = counts_type
        self._summary = summary
        self._live = live and not quiet
        self._plain = not live and not quiet
        self._started = time.monotonic()
        self._drawn = 0.0
        self._line_shown = False
        self.keys: set[str] = set()
        self.done: set[str] = set()
        self.without_work: set[str] = set()
        self.failed: dict[str, PartitionOutcome] = {}  # failed, or stopped before they were finished
        self.left: set[str] = set()  # left to the other runs working on them
        self.totals = counts_type()
        self.replication_wait_s = 0.0
        self.total_files = 0
        self.done_files = 0
        self.failed_files = 0
        self.waiting_for: str | None = None
        self._waiting_since = 0.0
        self.paused_by: str | None = None  # the operator's pause, in words
        self._paused_since = 0.0
        self.paused_s = 0.0
        self.stop_reason: str | None = None

    # The Listener

    def planned(self, plan: Plan) -> None:
        first_time = set(plan.without_work) - self.keys
        self.keys |= set(plan.with_work) | set(plan.without_work)
        self.without_work |= first_time
        self.done |= first_time
        for key in plan.with_work:  # a step retry works its failed partitions again
            self.done.discard(key)
            self.failed.pop(key, None)
            self.left.discard(key)
        self.total_files = self.done_files + plan.files_to_do
        self._say(
            f"{len(plan.with_work)} of {plan.partition_count} partitions have work ({plan.files_to_do:,} files); "
            f"{len(plan.without_work)} have nothing to do"
        )
        self._draw(force=True)

    def paused(self, text: str | None) -> None:
        if text is not None and self.paused_by is None:
            self._paused_since = time.monotonic()
        if text is None and self.paused_by is not None:
            self.paused_s += time.monotonic() - self._paused_since
            self._say("resumed")
        self.paused_by = text
        if text is not None:
            self._say(text)
        self._draw(force=True)

    def files_done(self, files: int, failed: int) -> None:
        self.done_files += files
        self.failed_files += failed
        self._draw()

    def waiting(self, text: str | None) -> None:
        if text is not None and self.waiting_for is None:
            self._waiting_since = time.monotonic()
        if text is None and self.waiting_for is not None:
            self.replication_wait_s += time.monotonic() - self._waiting_since  # the run's wall time waiting
        self.waiting_for = text
        if text is not None and self._plain:
            print(f"waiting for replication: {text}", file=self._out, flush=True)
        self._draw(force=True)

    def stopping(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._say(f"stopping: {reason}")
            self._draw(force=True)

    def partition_done(self, outcome: PartitionOutcome) -> None:
        self.done.add(outcome.partition_key)
        self.totals += outcome.report.counts
        if outcome.ended is Ended.LEFT:
            self.left.add(outcome.partition_key)
            self._say(f"partition {outcome.partition_key} left to the run working on it")
        elif not outcome.succeeded:
            self.failed[outcome.partition_key] = outcome
            word = "STOPPED" if outcome.ended is Ended.STOPPED else "FAILED"
            if not outcome.error.startswith("not started"):
                self._say(f"partition {outcome.partition_key} {word}: {outcome.error}")
        elif self._verbose:
            counts = outcome.report.counts
            self._say(
                f"partition {outcome.partition_key}: " + " ".join(f"{n}={getattr(counts, n)}" for n in self._summary)
            )
        self._draw(force=True)

    # Drawing

    def status(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done_files / elapsed
        remaining = max(self.total_files - self.done_files, 0)
        eta = f"ETA {_duration(remaining / rate)}" if rate > 0 and remaining else "ETA -"
        if self.paused_by is not None:
            eta = f"{self.paused_by} ({_duration(time.monotonic() - self._paused_since)})"
        elif self.waiting_for is not None:
            since = _duration(time.monotonic() - self._waiting_since)
            eta = f"waiting for replication ({since}): {self.waiting_for}"
        elif self.stop_reason is not None:
            eta = f"stopping: {self.stop_reason}"
        return (
            f"partitions {len(self.done)}/{len(self.keys)} · files {self.done_files:,}/{self.total_files:,} · "
            f"{rate:,.0f} files/s · failed partitions {len(self.failed)}, files {self.failed_files:,} · {eta}"
        )

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live and (force or now - self._drawn >= REDRAW_INTERVAL_S):
            self._out.write("\r\x1b[2K" + self.status())
            self._out.flush()
            self._line_shown = True
            self._drawn = now
        elif self._plain and now - self._drawn >= PLAIN_INTERVAL_S:
            print(self.status(), file=self._out, flush=True)
            self._drawn = now

    def _say(self, line: str) -> None:
        """A line above the status line."""
        if self._line_shown:
            self._out.write("\r\x1b[2K")
            self._line_shown = False
        print(line, file=self._out, flush=True)

    def stopped_by(self) -> str | None:
        """Why a run stopped before its end (a failure no rerun of the same settings gets past), if it did."""
        return next((o.error for o in self.failed.values() if not o.retryable), None)

    def finish(self, run_errors: list[str], settings: RangeSettings) -> str:
        """Clear the status line; the summary table, with `run_errors` (failures of whole runs)."""
        if self._line_shown:
            self._out.write("\r\x1b[2K")
            self._out.flush()
            self._line_shown = False
        elapsed = time.monotonic() - self._started
        worked = len(self.done - self.without_work - self.left)
        stopped = sum(o.ended is Ended.STOPPED for o in self.failed.values())
        rows = [
            (
                "partitions",
                f"{len(self.done)} of {len(self.keys)} done: {worked} worked, "
                f"{len(self.without_work)} with nothing to do, {len(self.failed) - stopped} failed, {stopped} stopped, "
                f"{len(self.left)} left to other runs",
            ),
            *((name, f"{getattr(self.totals, name):,}") for name in self._summary),
            ("replication wait", f"{self.replication_wait_s:.1f}s"),
            *([("paused", f"{self.paused_s:.1f}s")] if self.paused_s else []),
            ("failure threshold", settings.threshold_text()),
            # The status line's count of files done: the same files as `processed` above.
            (
                "elapsed",
                f"{elapsed:.1f}s ({self.done_files:,} files, "
                f"{self.done_files / elapsed if elapsed else 0:,.0f} files/s)",
            ),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"run failed: {error}" for error in run_errors]
        if self.stop_reason is not None:
            lines.append(f"stopped: {self.stop_reason}")
        if self.failed:
            lines.append("failed partitions (rerun with --partition): " + " ".join(sorted(self.failed)))
        if self.left:
            lines.append("left to the runs working on them: " + " ".join(sorted(self.left)))
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
