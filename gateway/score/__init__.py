"""Secure Score: control definitions (``controls``) and the stored score's upkeep (``upkeep``)."""
