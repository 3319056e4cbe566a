"""The code location: every definition under `defs/`, found by Dagster's `dg` project loader."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # Every run holds one step: a step process of its own would only add seconds to each partition.
        dg.Definitions(executor=dg.in_process_executor),
    )
