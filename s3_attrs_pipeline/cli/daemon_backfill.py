"""`s3-attrs backfill`: the daemon backfill the UI's "Materialize → Launch backfill" makes, launched
through the webserver's GraphQL API (Dagster's public API for it: what the UI itself sends), and with
--wait followed to its end. The backfill daemon plans and queues its runs and the run launcher
starts them (a pod each on Kubernetes), as for a backfill launched from the UI; this process only
asks and watches, so stopping it stops nothing but the watching."""

import dataclasses
import json
import urllib.error
import urllib.request

from s3_attrs_pipeline.settings import setting


@dataclasses.dataclass(frozen=True)
class BackfillSettings:
    webserver_url: str = setting(
        "http://localhost:3000",
        help="The Dagster webserver `s3-attrs backfill` launches backfills through (its GraphQL API), and whose "
        "backfill page it prints.",
        env="DAGSTER_WEBSERVER_URL",
        cli="--webserver",
        config=None,
    )


class WebserverError(Exception):
    """The webserver could not be reached, or refused what was asked."""


# What the UI sends for "Materialize → Launch backfill".
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
# What the backfill's page shows: its status and its partitions' counts.
BACKFILL_STATUS = """
query($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill {
      status
      assetBackfillData {
        assetBackfillStatuses {
          ... on AssetPartitionsStatusCounts {
            numPartitionsTargeted numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed
          }
        }
      }
    }
    ... on Error { message }
  }
}"""
# The asset's partitions as its Partitions tab shows them.
FAILED_PARTITIONS = """
query($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      assetPartitionStatuses { ... on DefaultPartitionStatuses { failedPartitions } }
    }
    ... on Error { message }
  }
}"""
# A backfill in one of these has no run left to launch or wait for.
ENDED = frozenset({"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"})
# The statuses as the backfill's page names them.
SHOWN_STATUS = {
    "REQUESTED": "in progress",
    "COMPLETED_SUCCESS": "succeeded",
    "COMPLETED_FAILED": "failed",
    "FAILED": "failed",
    "FAILING": "failing",
    "CANCELING": "canceling",
    "CANCELED": "canceled",
}
REQUEST_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class BackfillProgress:
    status: str
    targeted: int
    in_progress: int
    materialized: int
    failed: int

    @property
    def shown_status(self) -> str:
        return SHOWN_STATUS.get(self.status, self.status.lower().replace("_", " "))

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def succeeded(self) -> bool:
        return self.status in ("COMPLETED", "COMPLETED_SUCCESS") and self.failed == 0


def _graphql(webserver_url: str, query: str, variables: dict) -> dict:
    """The `data` of a GraphQL request to the webserver; WebserverError naming the webserver and what failed."""
    endpoint = webserver_url.rstrip("/") + "/graphql"
    request = urllib.request.Request(
        endpoint,
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        raise WebserverError(f"the Dagster webserver at {webserver_url} answered HTTP {error.code}") from None
    except (OSError, ValueError) as error:
        raise WebserverError(
            f"cannot reach the Dagster webserver at {webserver_url} ({error}); set DAGSTER_WEBSERVER_URL or --webserver"
        ) from None
    if answer.get("errors"):
        raise WebserverError(f"the Dagster webserver at {webserver_url}: {answer['errors'][0].get('message')}")
    return answer["data"]


def _answer(data: dict, field: str, expected: str, webserver_url: str) -> dict:
    result = data[field]
    if result["__typename"] != expected:
        raise WebserverError(
            f"the Dagster webserver at {webserver_url}: {result['__typename']}: {result.get('message', '')}"
        )
    return result


def backfill_params(asset_name: str, partition_keys: list[str], tags: dict[str, str]) -> dict:
    """LAUNCH_BACKFILL's parameters: what the UI's "Materialize…" dialog sends (every key by name)."""
    return {
        "partitionNames": partition_keys,
        "assetSelection": [{"path": [asset_name]}],
        "fromFailure": False,
        "tags": [{"key": key, "value": value} for key, value in tags.items()],
    }


def launch(webserver_url: str, asset_name: str, partition_keys: list[str], tags: dict[str, str]) -> str:
    """A backfill of `asset_name`'s partitions, as the UI launches it; its id."""
    params = backfill_params(asset_name, partition_keys, tags)
    data = _graphql(webserver_url, LAUNCH_BACKFILL, {"params": params})
    return _answer(data, "launchPartitionBackfill", "LaunchBackfillSuccess", webserver_url)["backfillId"]


def progress(webserver_url: str, backfill_id: str) -> BackfillProgress:
    data = _graphql(webserver_url, BACKFILL_STATUS, {"backfillId": backfill_id})
    backfill = _answer(data, "partitionBackfillOrError", "PartitionBackfill", webserver_url)
    counts = (backfill["assetBackfillData"] or {}).get("assetBackfillStatuses") or [{}]
    return BackfillProgress(
        status=backfill["status"],
        targeted=sum(c.get("numPartitionsTargeted", 0) for c in counts),
        in_progress=sum(c.get("numPartitionsInProgress", 0) for c in counts),
        materialized=sum(c.get("numPartitionsMaterialized", 0) for c in counts),
        failed=sum(c.get("numPartitionsFailed", 0) for c in counts),
    )


def failed_partitions(webserver_url: str, asset_name: str, partition_keys: list[str]) -> list[str]:
    """Those of `partition_keys` that show failed for the asset now."""
    data = _graphql(webserver_url, FAILED_PARTITIONS, {"assetKey": {"path": [asset_name]}})
    node = _answer(data, "assetNodeOrError", "AssetNode", webserver_url)
    failed = set((node["assetPartitionStatuses"] or {}).get("failedPartitions") or [])
    return [key for key in partition_keys if key in failed]


def backfill_page(webserver_url: str, backfill_id: str) -> str:
    return f"{webserver_url.rstrip('/')}/runs/b/{backfill_id}?tab=partitions"
