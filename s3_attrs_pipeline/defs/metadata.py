"""Dagster metadata from the pipeline's reports: numbers as numbers, lists of records as tables."""

import dataclasses

import dagster as dg


def table(record_type: type, records: list) -> dg.TableMetadataValue:
    """A table of `record_type` dataclass records, one column per field (also when there are none)."""
    columns = [field.name for field in dataclasses.fields(record_type)]
    return dg.MetadataValue.table(
        records=[dg.TableRecord(dataclasses.asdict(record)) for record in records],
        schema=dg.TableSchema(columns=[dg.TableColumn(name) for name in columns]),
    )


def numbers(**values: int | float) -> dict[str, dg.MetadataValue]:
    return {
        name: dg.MetadataValue.float(round(value, 3)) if isinstance(value, float) else dg.MetadataValue.int(value)
        for name, value in values.items()
    }
