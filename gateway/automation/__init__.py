"""Workflow automation: per-tenant rules that act on the outbox's events (issue 13 item 4).

A rule has a trigger (event types, as destinations take them, and an OData ``$filter`` on the
subject) and ordered actions: ``webhook`` (a POST signed per Standard Webhooks with the rule's
secret, by gateway/export/webhook.py), ``setFields`` (the customer-owned fields of the subject,
through the workflow edit path ``gateway.query.apply_edit``, recorded in its history with the rule
as the cause) and ``createTicket`` (an ITSM ticket through ``gateway.itsm.sync.open_tickets``:
exactly one per item and connection).

``actions`` (the action kinds: checking them when a rule is saved, running them, describing a dry
run), ``runner`` (a rule's cursor over the outbox, once per (rule, event, action), errors, the
chain limit), ``api`` (``/api/v1/tenants/<tenant>/automations``), ``cli`` (``gateway automation``).
The Celery tasks are in workers/automation_tasks.py.
"""
