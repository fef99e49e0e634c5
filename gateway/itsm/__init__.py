"""ITSM ticket sync (issue 12): ServiceNow and Jira connections, sync rules, tickets.

* ``vault``: the connections' secrets, encrypted at rest (Fernet, keys from configuration).
* ``clients``: one client per system over a ``requests.Session`` with timeouts; errors say whether a
  retry can help.
* ``feed``: which items changed, read from ``lifecycle_events`` with a per-connection watermark.
* ``sync``: rules -> tickets and queued operations (one transaction per scan, idempotent).
* ``deliver``: the queue of a connection sent to the ITSM, in order, exactly one record per ticket.
* ``tasks``: the Celery tasks (remote calls happen only there, and in a connection test).
"""
