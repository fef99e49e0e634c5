"""A merged store of millions of findings, generated inside PostgreSQL (for bench/million.py).

    seed_store(url, "seeded", 5_000_000)

What a tenant holds after months of Qualys and Tenable scans of ``findings / 50`` hosts, 50
findings each, written with ``INSERT ... SELECT ... FROM generate_series`` table by table in the
order the store's keys need (resources, identifiers, host records, the recommendation type,
findings, sources, the kept per-provider counts, recommendations, lifecycle events).  Row by row
through the merge this would take hours; sent as rows from the client (bench/query_bench.py's
loader, every index live) 5,000,000 findings took over 8 minutes for the findings table alone.  So
for the load the loaded tables' secondary indexes, unique constraints and foreign keys are
dropped and then rebuilt from their own catalog definitions (``pg_get_indexdef``,
``pg_get_constraintdef``) with ``maintenance_work_mem`` raised, in a session with
``synchronous_commit`` off; the schema after the load is compared with the one before (every
index's and constraint's definition) and the seed fails if they differ.  The statement triggers
that keep ``provider_findings`` are disabled for the load and those rows written set-based
instead (the same rows the triggers keep), then ``VACUUM ANALYZE``.

The rows are shaped like what the merge itself writes (compared column by column with one merged
push): host ``h{i}.bench.example.com`` with its ``ipv4`` and short ``name`` identifiers, as
``bench/million.py``'s pushes name their hosts, so a push of H <= ``findings / 50`` hosts lands on
stored hosts; host i holds CVE-2024-(10008 + k) for its k-th finding (k < 50; every tenth one a
QID-keyed finding without a CVE instead), so a push whose host i names CVE-2024-(10000 + k) for k
< 10 (million.py: 10 findings a host) meets stored findings for k = 8 and 9: 20% of its findings
add a source to a stored finding, 80% are new findings on stored hosts.  Every finding has a
Qualys source, 40% a Tenable one too; 7% are resolved; each host has an Unhealthy
vulnerability-assessment recommendation and each finding its ``new`` lifecycle event (sequenced).
"""

from __future__ import annotations

import time

import psycopg

from gateway.merge.findings import VULNERABILITY_TYPE

# The tables the seed writes (their indexes and foreign keys are rebuilt around the load).
TABLES = ("resources", "resource_identifiers", "resource_sources", "findings", "finding_sources",
          "provider_findings", "recommendations", "lifecycle_events")
PER_HOST = 50
SEVERITY = """CASE WHEN u1 < 0.02 THEN 'informational' WHEN u1 < 0.10 THEN 'low'
                   WHEN u1 < 0.28 THEN 'medium' WHEN u1 < 0.92 THEN 'high' ELSE 'critical' END"""
STATE = """CASE WHEN u2 < 0.05 THEN 'new' WHEN u2 < 0.91 THEN 'active'
                WHEN u2 < 0.93 THEN 'reopened' ELSE 'resolved' END"""


def _schema(conn: psycopg.Connection) -> list[tuple]:
    """Every index's and constraint's definition in the public schema (the seed must not change them)."""
    return conn.execute("""
        SELECT 'index', tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        UNION ALL
        SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'trigger', tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) || ' ' || tgenabled::text
        FROM pg_trigger WHERE NOT tgisinternal
        ORDER BY 1, 2, 3""").fetchall()


def _drop_for_load(conn: psycopg.Connection) -> list[str]:
    """Drop the loaded tables' foreign keys (both ways), unique constraints and secondary indexes
    (primary keys stay: ids grow, so their inserts append); the statements that restore them."""
    tables = list(TABLES)
    foreign = conn.execute("""
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE contype = 'f' AND (conrelid::regclass::text = ANY(%s) OR confrelid::regclass::text = ANY(%s))
        ORDER BY 1, 2""", (tables, tables)).fetchall()
    unique = conn.execute("""
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE contype = 'u' AND conrelid::regclass::text = ANY(%s) ORDER BY 1, 2""", (tables,)).fetchall()
    indexes = conn.execute("""
        SELECT i.indexname, i.indexdef FROM pg_indexes i
        WHERE i.schemaname = 'public' AND i.tablename = ANY(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname
                          AND c.connamespace = 'public'::regnamespace)
        ORDER BY 1""", (tables,)).fetchall()
    for table, name, _ in foreign + unique:
        conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    return ([definition for _, definition in indexes]
            + [f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
               for table, name, definition in unique + foreign])


def _contiguous(conn: psycopg.Connection, table: str, tenant_id: int, count: int) -> int:
    """The first id of the ``count`` rows just loaded into ``table``; they must be contiguous."""
    first, last, rows = conn.execute(f"SELECT min(id), max(id), count(*) FROM {table} WHERE tenant_id = %s",
                                     (tenant_id,)).fetchone()
    if rows != count or last - first + 1 != count:
        raise SystemExit(f"{table}: {rows} rows, ids {first}..{last}: not one contiguous block")
    return first


def seed_store(url: str, tenant: str, findings: int) -> dict[str, float]:
    """Load ``findings`` findings into the (empty) tenant ``tenant``; the seconds of each step."""
    hosts = max(1, findings // PER_HOST)
    steps: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        def step(label: str, sql: str) -> None:
            started = time.perf_counter()
            conn.execute(sql)
            steps[label] = steps.get(label, 0.0) + time.perf_counter() - started

        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SELECT setseed(0.42)")
        tid = conn.execute("SELECT id FROM tenants WHERE external_id = %s", (tenant,)).fetchone()[0]
        if conn.execute("SELECT count(*) FROM findings WHERE tenant_id = %s", (tid,)).fetchone()[0]:
            raise SystemExit(f"tenant {tenant} already holds findings")
        before = _schema(conn)
        restore = _drop_for_load(conn)
        conn.execute("ALTER TABLE finding_sources DISABLE TRIGGER USER")
        # host i: h{i}.bench.example.com, 10.(i>>16).(i>>8).(i&255), as million.py's write_body names it
        step("resources", f"""
            INSERT INTO resources (tenant_id, kind, name, os, first_seen, last_seen, created_at, updated_at,
                                   tags)
            SELECT {tid}, 'vm', 'h' || i || '.bench.example.com', 'Ubuntu 22.04',
                   timestamptz '2024-01-01' + i * interval '1 second', timestamptz '2024-03-01', now(), now(),
                   '[]'
            FROM generate_series(0, {hosts - 1}) i ORDER BY i""")
        first_resource = _contiguous(conn, "resources", tid, hosts)
        ip = "'10.' || (i >> 16 & 255) || '.' || (i >> 8 & 255) || '.' || (i & 255)"
        step("resource_identifiers", f"""
            INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id)
            SELECT {tid}, k.kind, CASE k.kind WHEN 'fqdn' THEN 'h' || i || '.bench.example.com'
                                              WHEN 'ipv4' THEN {ip} ELSE 'h' || i END,
                   {first_resource} + i
            FROM generate_series(0, {hosts - 1}) i
            CROSS JOIN (VALUES ('fqdn'), ('ipv4'), ('name')) k(kind)""")
        step("resource_sources", f"""
            INSERT INTO resource_sources (tenant_id, resource_id, provider, product, record_key, host_key,
                                          identifiers, first_seen, last_seen, created_at, updated_at)
            SELECT {tid}, {first_resource} + i, p.provider, p.product, 'ids:' || md5(p.provider || i), NULL,
                   jsonb_build_object('fqdn', jsonb_build_array('h' || i || '.bench.example.com'),
                                      'ipv4', jsonb_build_array({ip})),
                   timestamptz '2024-01-01', timestamptz '2024-03-01', now(), now()
            FROM generate_series(0, {hosts - 1}) i
            CROSS JOIN (VALUES ('Qualys', 'Qualys VMDR'), ('Tenable', 'Tenable.io')) p(provider, product)""")
        spec = VULNERABILITY_TYPE
        rt = conn.execute(
            "INSERT INTO recommendation_types (tenant_id, key, provider, kind, title, description, "
            "remediation, severity, categories, control) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s) "
            "ON CONFLICT (tenant_id, key) DO UPDATE SET title = excluded.title RETURNING id",
            (tid, spec["key"], spec["provider"], spec["kind"], spec["title"], spec["description"],
             spec["remediation"], spec["severity"], psycopg.types.json.Jsonb(spec["categories"]),
             spec["control"])).fetchone()[0]
        # finding g (0-based) is the k-th (k = g / hosts) on host i = g mod hosts
        step("findings", f"""
            INSERT INTO findings (tenant_id, resource_id, recommendation_type_id, correlation_key, cve, kind,
                                  title, description, remediation, severity, cvss_score, state, first_seen,
                                  last_seen, resolved_at, state_changed_at, created_at, updated_at, comments,
                                  tags)
            SELECT {tid}, {first_resource} + i, {rt}, key, cve, 'vulnerability',
                   'Vulnerability ' || key, 'A synthetic finding about ' || key || ' on host h' || i
                       || '; it carries a description of a realistic length for a scanner plug-in.',
                   'Upgrade the affected package to the fixed version.',
                   {SEVERITY}, round((u1 * 10)::numeric, 1), {STATE},
                   seen, seen + (u3 * 30) * interval '1 day',
                   CASE WHEN u2 >= 0.93 THEN seen + interval '31 days' END,
                   seen, seen, seen + (u3 * 30) * interval '1 day', '[]', '[]'
            FROM (SELECT g, i, CASE WHEN k % 10 = 9 THEN NULL ELSE c END AS cve,
                         CASE WHEN k % 10 = 9 THEN 'qualys:' || (100000 + g) ELSE c END AS key,
                         u1, u2, u3, timestamptz '2024-01-01' + (u4 * 30) * interval '1 day' AS seen
                  FROM (SELECT g, g % {hosts} AS i, g / {hosts} AS k,
                               'CVE-2024-' || (10008 + g / {hosts}) AS c,
                               random() AS u1, random() AS u2, random() AS u3, random() AS u4
                        FROM generate_series(0, {findings - 1}) g) numbered) shaped
            ORDER BY g""")
        first_finding = _contiguous(conn, "findings", tid, findings)
        step("finding_sources", f"""
            INSERT INTO finding_sources (tenant_id, finding_id, resource_id, provider, provider_id,
                                         correlation_key, vendor_id, state, title, severity,
                                         severity_original, severity_scale, "references", first_seen,
                                         last_seen, provider_timestamp, content_hash, created_at, updated_at,
                                         product, format)
            SELECT f.tenant_id, f.id, f.resource_id, p.provider, p.prefix || (f.id - {first_finding}),
                   f.correlation_key, '1' || (f.id % 90000),
                   CASE WHEN f.state = 'resolved' THEN 'fixed' ELSE 'open' END, f.title, f.severity,
                   f.severity, 'canonical', '[]', f.first_seen, f.last_seen, f.updated_at,
                   md5(p.prefix || f.id), f.created_at, f.updated_at, p.product, p.format
            FROM findings f
            JOIN (VALUES ('Qualys', 'q-', 0, 'Qualys VMDR', 'qualys-xml'),
                         ('Tenable', 't-', 1, 'Tenable.io', 'nessus'))
                 AS p(provider, prefix, second, product, format)
              ON p.second = 0 OR f.id % 5 < 2
            WHERE f.tenant_id = {tid}
            ORDER BY f.id, p.second""")
        # what the statement triggers on finding_sources keep (migration 0026), written set-based
        step("provider_findings", f"""
            INSERT INTO provider_findings (tenant_id, provider, finding_id, sources)
            SELECT tenant_id, provider, finding_id, count(*) FROM finding_sources WHERE tenant_id = {tid}
            GROUP BY 1, 2, 3""")
        step("provider_findings", f"""
            INSERT INTO provider_finding_counts (tenant_id, provider, findings)
            SELECT tenant_id, provider, count(*) FROM provider_findings WHERE tenant_id = {tid}
            GROUP BY 1, 2""")
        step("recommendations", f"""
            INSERT INTO recommendations (tenant_id, resource_id, type_id, status, severity, first_evaluated,
                                         status_changed_at, updated_at, comments, tags, actual_status,
                                         actual_severity)
            SELECT {tid}, resource_id, {rt}, 'Unhealthy', 'critical', now(), now(), now(), '[]', '[]',
                   'Unhealthy', 'critical'
            FROM generate_series({first_resource}, {first_resource + hosts - 1}) resource_id""")
        # each finding's "new" event, already sequenced (the sequencer has nothing left to do)
        last_seq = conn.execute("SELECT coalesce(max(seq), 0) FROM lifecycle_events").fetchone()[0]
        step("lifecycle_events", f"""
            INSERT INTO lifecycle_events (tenant_id, subject_type, subject_id, event, at, cause, batch_id,
                                          actor, details, seq)
            SELECT {tid}, 'finding', id, 'new', created_at, 'seed', NULL, 'Qualys',
                   jsonb_build_object('state', 'new', 'severity', severity),
                   {last_seq} + id - {first_finding} + 1
            FROM findings WHERE tenant_id = {tid} ORDER BY id""")
        conn.execute("INSERT INTO event_sequencer (id, last_seq) VALUES (1, %s) ON CONFLICT (id) "
                     "DO UPDATE SET last_seq = greatest(event_sequencer.last_seq, excluded.last_seq)",
                     (last_seq + findings,))
        started = time.perf_counter()
        for statement in restore:
            conn.execute(statement)
        conn.execute("ALTER TABLE finding_sources ENABLE TRIGGER USER")
        steps["indexes and constraints"] = time.perf_counter() - started
        if _schema(conn) != before:
            raise SystemExit("the seeded schema differs from the migrated one")
        started = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        steps["VACUUM ANALYZE"] = time.perf_counter() - started
    return steps
