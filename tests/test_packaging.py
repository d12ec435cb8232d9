"""The package's declared dependencies against the pinned set CI installs and tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def test_every_pin_satisfies_the_declared_floor_and_the_tested_floors_are_the_pins() -> None:
    """requirements.txt (what .ci/run installs) meets every pyproject requirement, so the declared
    floors are never above what is tested; transformers and gguf, whose older releases the suite
    fails on (measured: pyproject.toml's comment), are declared at the pinned version itself."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (CI's)
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned in requirements.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} does not meet {req}"
    floors = {canonicalize_name(r.name): list(r.specifier) for r in declared}
    for name in ("transformers", "gguf"):
        (floor,) = floors[name]
        assert floor.operator == ">=" and Version(floor.version) == Version(pins[name]), (name, floor)
