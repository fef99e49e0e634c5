"""Fixtures for connector tests: the real sample files in ../shared/samples."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import connectors
from connectors.base import ParseOptions


def _samples_dir() -> Path:
    configured = os.environ.get("GATEWAY_SAMPLES")
    if configured:
        return Path(configured)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "samples"
        if candidate.is_dir():
            return candidate
    raise RuntimeError("shared/samples not found: set GATEWAY_SAMPLES")


SAMPLES = _samples_dir()


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
