"""Telling people: a Slack-compatible JSON body posted to an incoming webhook (Slack, Mattermost, and
most chat tools take `{"text": ...}`). Off unless the environment names a webhook."""

import dataclasses
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from s3_attrs_pipeline.settings import resolve, setting

POST_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class AlertSettings:
    webhook_url: str | None = setting(
        None,
        help="An incoming webhook (Slack-compatible: a JSON body with `text`) told of every failed backfill, heal, "
        "refresh or control run and every failed check; unset, nobody is told.",
        env="S3_ATTRS_ALERT_WEBHOOK_URL",
        config=None,
    )


def webhook_url(environ: Mapping[str, str]) -> str | None:
    """The webhook named in `environ` (environment.read()); None: alerts are off."""
    return resolve(AlertSettings, {}, environ).webhook_url


class AlertNotSent(Exception):
    """The webhook did not take the alert."""


def post(webhook_url: str, text: str) -> None:
    """Post `text` to the webhook; AlertNotSent naming the webhook's host and what went wrong."""
    request = urllib.request.Request(
        webhook_url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}
    )
    host = urllib.parse.urlsplit(webhook_url).netloc  # never the whole URL: a webhook's path is its secret
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise AlertNotSent(f"the webhook at {host} answered HTTP {error.code}") from None
    except OSError as error:
        raise AlertNotSent(f"cannot reach the webhook at {host}: {error}") from None
