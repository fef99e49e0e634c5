"""Detection (issue 16 part B): host security events in, the KEV catalogue, detection rules as data.

``events.py`` stores pushed events (the batch machinery merges them) and keeps their partitions;
``kev.py`` the known-exploited-vulnerabilities catalogue; ``rules.py`` loads rules (built-ins in
``rules/*.yaml``, a tenant's overrides and custom rules); ``engine.py`` evaluates them set-based in
SQL and raises ordinary alerts through the alert merge; ``api.py`` serves it.
"""
