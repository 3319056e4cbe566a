import dagster as dg

from s3_attrs_pipeline.defs.assets import files_s3_attrs
from s3_attrs_pipeline.defs.resources import resources_from_env

defs = dg.Definitions(
    assets=[files_s3_attrs],
    resources=resources_from_env(),
)
