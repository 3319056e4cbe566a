import sys

from s3_attrs_pipeline.cli.commands import main

sys.exit(main())
