"""The InstantDB domain: system ids, object keys, triple encoding and the SQL that reads and writes them.

Nothing in this package knows about Dagster or S3 clients.
"""
