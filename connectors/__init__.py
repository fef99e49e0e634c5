"""Format connectors: one module per format, bytes in, canonical records out.

Every module in this package except the support modules below is a connector and
is registered when the package is imported.  Registration raises on a duplicate
format name or on a module that does not follow the protocol of ``base.Connector``,
so a renamed or broken connector fails loudly instead of silently vanishing.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

SUPPORT_MODULES = frozenset({"base", "model", "xmlsafe", "_json", "_qualys", "_tenable", "_indicators", "_events",
                             "_stream"})
REQUIRED_ATTRIBUTES = ("FORMAT", "TITLE", "PRODUCT", "CONTENT_TYPES", "RECORD_KIND", "sniff", "parse")
RECORD_KINDS = ("findings", "alerts", "knowledge_base", "indicators", "events")

REGISTRY: dict[str, ModuleType] = {}


class UnknownFormat(LookupError):
    """No connector has that format name."""


def register(module: ModuleType) -> ModuleType:
    """Add a connector module to the registry; raise on duplicates or missing parts."""
    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(module, name)]
    if missing:
        raise TypeError(f"connector {module.__name__} lacks {', '.join(missing)}")
    if module.RECORD_KIND not in RECORD_KINDS:
        raise TypeError(f"connector {module.__name__} has unknown RECORD_KIND {module.RECORD_KIND!r}")
    if module.FORMAT in REGISTRY and REGISTRY[module.FORMAT] is not module:
        raise ValueError(
            f"format {module.FORMAT!r} registered twice: "
            f"{REGISTRY[module.FORMAT].__name__} and {module.__name__}"
        )
    REGISTRY[module.FORMAT] = module
    return module


def connector_module_names() -> list[str]:
    """Names of the connector modules in this package."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if info.name not in SUPPORT_MODULES and not info.name.startswith("test")
    )


def get(format_name: str) -> ModuleType:
    """The connector for a format name."""
    try:
        return REGISTRY[format_name]
    except KeyError:
        raise UnknownFormat(format_name) from None


def detect(head: bytes) -> str | None:
    """The format whose connector recognises these first bytes, if exactly one does."""
    matches = [name for name, module in sorted(REGISTRY.items()) if module.sniff(head)]
    return matches[0] if len(matches) == 1 else None


def formats() -> list[str]:
    """All registered format names, sorted."""
    return sorted(REGISTRY)


for _name in connector_module_names():
    register(importlib.import_module(f"{__name__}.{_name}"))
