"""pyproject.toml's floors keep out the versions with a known advisory on a path nanoseek uses, and
the installed environment meets every floor."""

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]

ADVISORIES = {  # package: (its last affected version, the advisory and where nanoseek meets it)
    "torch": ("2.9.1", "CVE-2026-24747: a crafted file corrupts memory under torch.load(weights_only=True), "
                       "which resuming a run folder uses"),
    "pyarrow": ("14.0.0", "CVE-2023-47248: reading a crafted parquet file runs code; corpora are user parquet"),
    "jinja2": ("3.1.5", "CVE-2025-27516: a template escapes the sandbox; chat templates come with model folders"),
    "starlette": ("1.3.0", "CVE-2026-54283, CVE-2026-48710, CVE-2025-62727: the server's requests and static files"),
    "h11": ("0.15.0", "CVE-2025-43859: request smuggling through uvicorn's parser"),
}


def test_no_floor_admits_a_version_with_a_known_advisory():
    declared = {r.name.lower(): r.specifier for r in DEPENDENCIES}
    for name, (affected, advisory) in ADVISORIES.items():
        assert name in declared, f"declare {name} with a floor past {affected} ({advisory})"
        assert not declared[name].contains(affected), f"{name} {affected} is allowed: {advisory}"


def test_the_installed_versions_meet_the_floors():
    for r in DEPENDENCIES:
        assert r.specifier.contains(version(r.name), prereleases=True), f"{r.name} {version(r.name)} is not {r}"
