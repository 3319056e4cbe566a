"""The layout's promise, read from the source: dependencies point one way, no module imports another in
a cycle, and nothing below the Dagster wiring (defs/) and the CLI (cli/) imports Dagster."""

import ast
import pathlib

from s3_attrs_pipeline_tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "s3_attrs_pipeline"

# What each part may import of the package (besides itself and the leaves every part may use).
LEAVES = {"settings", "environment", "counts"}
MAY_IMPORT = {
    "instant": set(),
    "s3": set(),
    "tasks": {"instant", "s3"},
    "runs": {"instant", "s3", "tasks"},
    "verification": {"instant", "s3"},
    "deployment": {"instant"},
    "local": {"instant", "s3"},
    "alerts": set(),
    "defs": {"instant", "s3", "tasks", "runs", "verification", "deployment", "alerts"},
    "cli": {"instant", "s3", "tasks", "runs", "verification", "deployment", "defs", "local"},
}
WITHOUT_DAGSTER = {
    "instant",
    "s3",
    "tasks",
    "runs",
    "verification",
    "deployment",
    "alerts",
    "settings",
    "environment",
    "counts",
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (a function's own imports included):
    `from package import module` imports the module, `from module import name` the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_every_part_imports_only_what_lies_below_it():
    wrong = []
    for module, imported in _graph().items():
        part = _part(module)
        allowed = MAY_IMPORT.get(part)
        if allowed is None:
            continue
        for other in imported:
            other_part = _part(other)
            if other_part not in allowed | LEAVES | {part}:
                wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_no_module_imports_another_in_a_cycle():
    graph = _graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "visiting"
        for other in sorted(graph[module]):
            if state.get(other) == "visiting":
                cycles.append(path[path.index(other) :] + [other] if other in path else [module, other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_below_the_dagster_wiring_nothing_imports_dagster():
    importers = [
        _module_name(path)
        for path in PACKAGE.rglob("*.py")
        if _part(_module_name(path)) in WITHOUT_DAGSTER
        and any(name == "dagster" or name.startswith("dagster.") for name in _imports(path))
    ]
    assert importers == []


def test_the_readme_names_every_declared_setting_with_its_default():
    """The README's table of settings is the user's view of the declarations: none is left out."""
    from s3_attrs_pipeline.alerts import AlertSettings
    from s3_attrs_pipeline.cli.daemon_backfill import BackfillSettings
    from s3_attrs_pipeline.deployment import DeploymentSettings
    from s3_attrs_pipeline.instant.connection import SessionLimits
    from s3_attrs_pipeline.instant.replication import ReplicationLimits
    from s3_attrs_pipeline.runs.range_run import RangeSettings
    from s3_attrs_pipeline.s3.store import S3Settings
    from s3_attrs_pipeline.settings import declared
    from s3_attrs_pipeline.tasks.task import TaskSettings

    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("| setting | where | default | meaning |") :].split("\n\n", 1)[0]
    rows = {line.split("|")[1]: line.split("|")[2:4] for line in table.splitlines()[2:]}
    missing = []
    for settings_class in (
        TaskSettings,
        RangeSettings,
        ReplicationLimits,
        S3Settings,
        SessionLimits,
        DeploymentSettings,
        BackfillSettings,
        AlertSettings,
    ):
        for setting in declared(settings_class):
            if setting.name in ("bucket", "endpoint_url", "region_name", "connect_timeout_s"):
                continue  # the environment's, in the table of variables above it
            name = setting.config or setting.name
            row = next((cells for names, cells in rows.items() if f"`{name}`" in names), None)
            if (
                row is None
                or (setting.cli and setting.cli not in row[0])
                or (setting.env and setting.env not in row[0])
                or setting.default_text() not in row[1]
            ):
                missing.append(name)
    assert missing == []
