"""Posture: the tenant's security policy, exemptions and control profiles, and how they make a
recommendation's effective status (see gateway/posture/status.py)."""
