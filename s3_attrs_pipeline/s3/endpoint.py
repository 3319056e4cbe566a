"""Where and how the store's boto3 client would send a request: its URL, signing region, signature
version and TLS verification, read from boto3 itself rather than re-implemented (custom endpoint or
AWS, path or virtual-hosted style, FIPS, dual-stack, a bucket region learned from a redirect)."""

import dataclasses
import os
import ssl
import urllib.parse

import botocore.httpsession

_PROBE_KEY = "s3-attrs-probe"


@dataclasses.dataclass(frozen=True)
class HeadTarget:
    """Where the store's boto3 client would send a head_object, and how it would sign it."""

    base_url: str  # scheme://host[:port][/path prefix][/bucket], without the trailing "/" before the key
    region: str
    signature_version: str  # "s3v4" for every ordinary bucket

    @property
    def signable(self) -> bool:
        return self.signature_version in ("s3v4", "v4")


class _Prepared(Exception):
    """Stops a head_object right before it would be signed and sent."""

    def __init__(self, url: str, region: str, signature_version: str):
        super().__init__(url)
        self.url, self.region, self.signature_version = url, region, signature_version


def prepare_head_object(client, bucket: str, key: str) -> tuple[str, str, str]:
    """(URL, signing region, signature version) of the head_object `client` would send: it prepares
    the request and is stopped before signing it, so nothing is sent and no credentials are needed."""

    def stop_before_signing(request, region_name, signature_version, **_):
        signing_region = request.context.get("signing", {}).get("region") or region_name or "us-east-1"
        raise _Prepared(request.url, signing_region, str(signature_version))

    event, handler_id = "before-sign.s3.HeadObject", "s3-attrs-prepare-head-object"
    client.meta.events.register_first(event, stop_before_signing, unique_id=handler_id)
    try:
        client.head_object(Bucket=bucket, Key=key)
    except _Prepared as prepared:
        return prepared.url, prepared.region, prepared.signature_version
    finally:
        client.meta.events.unregister(event, unique_id=handler_id)
    raise RuntimeError("botocore sent a head_object without signing it")


def resolve_head_target(client, bucket: str) -> HeadTarget:
    """Where and how `client` would HEAD any key of `bucket`: its URL for one key, minus that key."""
    url, region, signature_version = prepare_head_object(client, bucket, _PROBE_KEY)
    parts = urllib.parse.urlsplit(url)
    suffix = "/" + _PROBE_KEY
    if parts.query or parts.fragment or not parts.path.endswith(suffix):
        raise RuntimeError(f"unexpected head_object URL {url!r}")
    base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(suffix)], "", ""))
    return HeadTarget(base_url, region, signature_version)


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """How botocore would verify an https endpoint: `verify` as its client takes it."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    # The CA bundle botocore would use: AWS_CA_BUNDLE / ca_bundle, else certifi's (a file or, as
    # botocore also allows, a directory of certificates).
    ca_path = botocore.httpsession.get_cert_path(verify)
    if os.path.isdir(ca_path):
        return ssl.create_default_context(capath=ca_path)
    return ssl.create_default_context(cafile=ca_path)
