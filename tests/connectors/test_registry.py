"""The registry: every connector module is registered, support modules are not connectors."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import connectors


def test_every_connector_module_is_registered():
    registered = {module.__name__.rsplit(".", 1)[1] for module in connectors.REGISTRY.values()}
    assert registered == set(connectors.connector_module_names())
    assert len(registered) == 14  # canonical + the 13 partner formats


def test_support_modules_exist_and_are_not_connectors():
    present = {info.name for info in pkgutil.iter_modules(connectors.__path__)}
    assert connectors.SUPPORT_MODULES <= present  # a stale name here would hide nothing, but lies
    for name in connectors.SUPPORT_MODULES:
        module = importlib.import_module(f"connectors.{name}")
        assert not hasattr(module, "FORMAT"), f"{name} looks like a connector"
        assert module not in connectors.REGISTRY.values()


def test_registering_a_duplicate_or_incomplete_module_raises():
    with pytest.raises(ValueError, match="registered twice"):
        duplicate = type(connectors.get("nessus"))("connectors.nessus_copy")
        for attribute in connectors.REQUIRED_ATTRIBUTES:
            setattr(duplicate, attribute, getattr(connectors.get("nessus"), attribute))
        connectors.register(duplicate)
    with pytest.raises(TypeError, match="lacks"):
        connectors.register(type(connectors.get("nessus"))("connectors.empty"))
