"""Threat intelligence (issue 16 part A): indicators pushed (Graph tiIndicator, STIX 2.1) or pulled
(TAXII 2.1), and matching them against alerts and resources.

* ``merge.py``: indicators in, one row per (tenant, source, observable), stale updates ignored;
* ``observables.py``: the observables named in alerts' evidence, kept in ``alert_observables``;
* ``matching.py``: set-based matching when either side arrives, raising or enriching alerts;
* ``taxii.py``: the scheduled pull of TAXII 2.1 collections with a watermark per feed;
* ``collection.py``: the ``indicators`` OData collection; ``tasks.py``: the beat tasks.
"""
