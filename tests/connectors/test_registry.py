"""The registry: every connector module is registered, support modules are not connectors."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import connectors


def test_every_connector_module_is_registered():
    registered = {module.__name__.rsplit(".", 1)[1] for module in connectors.REGISTRY.values()}
    assert registered == set(connectors.connector_module_names())
    assert len(registered) == 18  # canonical + the 13 partner formats + 2 indicator formats + 2 security event formats


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


EXPECTED_PRODUCTS = {
    "asc_assessment": "Microsoft Defender for Cloud",
    "asc_csv": "Microsoft Defender for Cloud",
    "asff": "AWS Security Hub",
    "canonical": "Gateway canonical",
    "checkpoint": "CloudGuard",
    "graph_alert": "Microsoft Graph",
    "graph_tiindicator": "Microsoft Graph",
    "stix21": "STIX 2.1",
    "nessus": "Nessus",
    "ocsf": "OCSF",
    "ocsf_events": "OCSF",
    "windows_events": "Windows",
    "qualys_csv": "Qualys VMDR",
    "qualys_hld": "Qualys VMDR",
    "qualys_kb": "Qualys VMDR",
    "qualys_scan_xml": "Qualys VMDR",
    "tenable_csv": "Tenable",
    "tenable_io": "Tenable.io",
}


def test_every_connector_names_its_product():
    for name, module in connectors.REGISTRY.items():
        assert isinstance(module.PRODUCT, str) and module.PRODUCT.strip(), f"{name} has no PRODUCT"
    assert {name: module.PRODUCT for name, module in connectors.REGISTRY.items()} == EXPECTED_PRODUCTS


def test_a_module_without_product_is_refused():
    incomplete = type(connectors.get("nessus"))("connectors.no_product")
    for attribute in connectors.REQUIRED_ATTRIBUTES:
        if attribute != "PRODUCT":
            setattr(incomplete, attribute, getattr(connectors.get("nessus"), attribute))
    with pytest.raises(TypeError, match="lacks PRODUCT"):
        connectors.register(incomplete)
