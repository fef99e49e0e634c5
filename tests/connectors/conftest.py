"""Fixtures for connector tests: the real sample files in tests/fixtures (sources: MANIFEST.tsv)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import connectors
from connectors.base import ParseOptions

# Inside the repository, so that a fresh clone runs the whole suite with nothing beside it.
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def sample():
    """Path of a sample file, e.g. sample('nessus_v2_xml/nessus_many_vuln.xml')."""

    def _path(relative: str) -> Path:
        path = SAMPLES / relative
        assert path.is_file(), f"missing sample {path}"
        return path

    return _path


def parse_all(format_name: str, data: bytes, provider: str = "Test") -> list:
    """Every record a connector yields for ``data``."""
    return list(connectors.get(format_name).parse(io.BytesIO(data), ParseOptions(provider=provider)))
