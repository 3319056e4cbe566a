"""The local services the demo and the tests stand on."""

import os

import pytest

pytestmark = pytest.mark.db


def test_the_local_s3_server_keeps_small_objects_in_memory_not_in_open_files():
    """Each object moto spools to a temporary file holds a descriptor for the server's life: a test
    session of tens of thousands of objects once ran out of them, and moto answered 500 to everything."""
    import boto3

    from s3_attrs_pipeline.local import s3_server

    process, endpoint = s3_server.start_s3_server()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="many-objects")
        before = len(os.listdir(f"/proc/{process.pid}/fd"))
        for n in range(300):
            client.put_object(Bucket="many-objects", Key=f"app/{n}", Body=b"x" * 100)
        assert len(os.listdir(f"/proc/{process.pid}/fd")) < before + 30
    finally:
        s3_server.stop_s3_server(process)
