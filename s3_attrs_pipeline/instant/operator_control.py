"""The operator's levers on every running backfill and refresh, in one row of InstantDB's `config`
table beside the progress rows: paused or not, a ceiling on S3 requests per second, and how many
partitions a run works at once. Runs read it every few seconds (tasks/control.py); `s3-attrs pause`,
`resume`, `throttle` and the UI's `operator_control` job write it. A row, not a run's config: it
reaches runs already running, and a pause holds a run launched (or retried) after it.
"""

import dataclasses
import datetime

import psycopg
from psycopg.types.json import Json

# Not under the progress rows' prefix: `s3-attrs reset` clears those and must not lift a pause.
CONTROL_CONFIG_KEY = "s3-attrs-control"

_READ = "SELECT v FROM config WHERE k = %(key)s"
_WRITE = """
INSERT INTO config (k, v) VALUES (%(key)s, %(value)s)
ON CONFLICT (k) DO UPDATE SET v = excluded.v
"""


@dataclasses.dataclass(frozen=True)
class OperatorControl:
    paused: bool = False
    max_rps: float | None = None  # S3 requests per second, per run; None: as fast as S3 allows
    partitions_at_once: int | None = None  # at most this many of a run's; None: the run's own setting
    reason: str | None = None  # of the latest change, with who made it and when
    set_by: str | None = None
    set_at: str | None = None

    def describe(self) -> str:
        """The control in words, as the CLI, the logs and the status line show it."""
        said = f" by {self.set_by}" if self.set_by else ""
        said += f" at {self.set_at}" if self.set_at else ""
        said += f": {self.reason}" if self.reason else ""
        if self.paused:
            return f"paused{said}"
        limits = []
        if self.max_rps is not None:
            limits.append(f"at most {self.max_rps:g} S3 requests/s per run")
        if self.partitions_at_once is not None:
            limits.append(f"at most {self.partitions_at_once} partitions at once per run")
        return ("running, " + ", ".join(limits) if limits else "running, no limit") + said

    @classmethod
    def from_row(cls, value: dict) -> "OperatorControl":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key.replace("-", "_"): v for key, v in value.items() if key.replace("-", "_") in names})

    def as_row(self) -> dict:
        return {field.name.replace("_", "-"): getattr(self, field.name) for field in dataclasses.fields(self)}


def read_control(conn: psycopg.Connection) -> OperatorControl:
    """The control as set (no row: running, no limit)."""
    row = conn.execute(_READ, {"key": CONTROL_CONFIG_KEY}).fetchone()
    return OperatorControl.from_row(row[0]) if row is not None else OperatorControl()


def changes(*, paused: bool | None = None, max_rps: float | None = None, partitions_at_once: int | None = None) -> dict:
    """What an operator asked to change: None leaves a lever as it is, 0 lifts a limit."""
    asked = {}
    if paused is not None:
        asked["paused"] = paused
    if max_rps is not None:
        asked["max_rps"] = max_rps or None
    if partitions_at_once is not None:
        asked["partitions_at_once"] = partitions_at_once or None
    return asked


def set_control(conn: psycopg.Connection, *, set_by: str, reason: str | None = None, **changes) -> OperatorControl:
    """The control with `changes` (paused, max_rps, partitions_at_once; None lifts a limit) made, with
    who made them and why, in one transaction; ValueError naming a value that is not one."""
    if changes.get("max_rps") is not None and not changes["max_rps"] > 0:
        raise ValueError(
            f"a ceiling of {changes['max_rps']} S3 requests per second: give a number above 0 (0 lifts it)"
        )
    if changes.get("partitions_at_once") is not None and changes["partitions_at_once"] < 1:
        raise ValueError(
            f"{changes['partitions_at_once']} partitions at once: give 1 or more (0 lifts it; to stop all work, pause)"
        )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (CONTROL_CONFIG_KEY,))
        control = dataclasses.replace(read_control(conn), reason=reason, set_by=set_by, set_at=now, **changes)
        conn.execute(_WRITE, {"key": CONTROL_CONFIG_KEY, "value": Json(control.as_row())})
    return control
