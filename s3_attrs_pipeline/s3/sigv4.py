"""AWS Signature V4 for the bodiless requests the pipeline signs itself (HEAD object, ListObjectsV2).

A few lines of hmac/hashlib with the derived key cached per day; the tests check it against
botocore's S3SigV4Auth.
"""

import functools
import hashlib
import hmac
import time
import urllib.parse

# The SHA-256 of an empty body: what botocore sends as x-amz-content-sha256 for a HEAD, over http
# and https alike, so S3 and every S3 look-alike sees the same headers as from boto3.
EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"
# The characters S3 leaves unencoded in a key: unreserved ones, and "/" between segments.
_KEY_SAFE_CHARACTERS = "/~"


def canonical_query(params: dict[str, str]) -> str:
    """A query string in SigV4's canonical form, which is also a valid one to send: names sorted, names
    and values percent-encoded but for unreserved characters."""
    quote = functools.partial(urllib.parse.quote, safe="~")
    return "&".join(f"{quote(name)}={quote(value)}" for name, value in sorted(params.items()))


def encode_key(key: str) -> str:
    """The key as it goes into the path: UTF-8, each byte but unreserved ones and "/" percent-encoded.
    This is also its canonical form: SigV4 for S3 signs the path as sent, without encoding it again."""
    return urllib.parse.quote(key.encode("utf-8"), safe=_KEY_SAFE_CHARACTERS)


def host_header(url: str) -> str:
    """The Host header botocore signs: lower-case host, the port only when not the scheme's default."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class SigV4Signer:
    """AWS Signature V4 headers for a bodiless request to one S3 host and region.

    The signing key depends only on the secret key and the day, so it is derived once per day
    (four HMACs) instead of for every request; a refreshed secret derives a new one. Thread-safe:
    the cache is one tuple, replaced whole.
    """

    def __init__(self, host: str, region: str, service: str = "s3"):
        self.host = host
        self.region = region
        self.service = service
        self._scope_suffix = f"/{region}/{service}/aws4_request"
        self._signing_key: tuple[str, str, bytes] = ("", "", b"")  # (secret key, yyyymmdd, key)

    def _key_for(self, secret_key: str, day: str) -> bytes:
        cached_secret, cached_day, key = self._signing_key
        if cached_secret != secret_key or cached_day != day:
            key = hmac.digest(f"AWS4{secret_key}".encode(), day.encode(), "sha256")
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._signing_key = (secret_key, day, key)
        return key

    def headers(
        self, method: str, path: str, credentials, amz_date: str | None = None, query: str = ""
    ) -> dict[str, str]:
        """The headers of a signed request for `path` (already encoded, see `encode_key`) and `query`
        (canonical: see `canonical_query`), `credentials` being botocore's frozen ones. `amz_date`
        (yyyymmddThhmmssZ, UTC) defaults to now."""
        if amz_date is None:
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = amz_date[:8]
        headers = {"host": self.host, "x-amz-content-sha256": EMPTY_PAYLOAD_SHA256, "x-amz-date": amz_date}
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        # Names are lower-case and already in sorted order; values have no spaces to trim.
        signed_names = ";".join(headers)
        canonical_request = "\n".join(
            (
                method,
                path,
                query,
                *(f"{name}:{value}" for name, value in headers.items()),
                "",
                signed_names,
                EMPTY_PAYLOAD_SHA256,
            )
        )
        scope = day + self._scope_suffix
        string_to_sign = "\n".join(
            (_ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
        )
        signature = hmac.new(self._key_for(credentials.secret_key, day), string_to_sign.encode(), "sha256").hexdigest()
        headers["authorization"] = (
            f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        return headers
