"""Score the merge's identity resolution against a fleet's labels.

The store is read through the read API (``/security/findings`` with their sources), not
the database: the API is what customers see, it is the same on PostgreSQL and SQLite,
and a source there carries everything the scorer needs (provider, providerId, the
finding's resource and CVE).  ``pipeline.Pusher.read`` follows ``@odata.nextLink``.

Units and truth:

* **resource merges**: the units are the labelled records that are not informational
  (one per (provider, provider_id)); truth "same machine", predicted "same resource"
  (the resourceId of the findings its sources are in).  A record with no source in the
  store is a resource of its own.
* **vulnerability merges**: the units are (record, true vulnerability) pairs: a record
  naming three CVEs is three units.  Truth "same machine and same vulnerability",
  predicted "same finding".  A source of a record is the unit of the finding's CVE when
  the record names it; a source keyed otherwise (a QID whose CVEs are not known, a
  vendor id) stands for the record's units that no CVE-keyed source covers.  A unit
  without a source is a finding of its own.
* **informational findings**: findings with a source from a record labelled "info"
  (must be 0).

Pairs are counted from contingency cells (truth cluster x predicted cluster):
TP = sum C(n_ij, 2), truth pairs = sum C(a_i, 2), predicted pairs = sum C(b_j, 2);
precision = TP / predicted pairs, recall = TP / truth pairs (1.0 when there are none).

Run ``python -m tests.fleet.score [--hosts N] [--seed N] [--order NAME|all]``: it generates
the fleet, pushes it through the real pipeline into a fresh SQLite store (or
``--database-url``), scores and prints a table, with the missed and false pairs by
category.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from tests.fleet.generate import Label

THRESHOLD = 0.98


def _c2(n: int) -> int:
    return n * (n - 1) // 2


@dataclass
class PairScore:
    tp: int
    truth_pairs: int
    predicted_pairs: int

    @property
    def precision(self) -> float:
        return self.tp / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.truth_pairs if self.truth_pairs else 1.0

    @property
    def false_pairs(self) -> int:
        return self.predicted_pairs - self.tp

    @property
    def missed_pairs(self) -> int:
        return self.truth_pairs - self.tp


def pair_score(units: Iterable[tuple[Hashable, Hashable]]) -> PairScore:
    """Pairwise scores of (truth cluster, predicted cluster) per unit, from group counts."""
    cells: Counter = Counter(units)
    truth: Counter = Counter()
    predicted: Counter = Counter()
    for (t, p), n in cells.items():
        truth[t] += n
        predicted[p] += n
    return PairScore(
        tp=sum(_c2(n) for n in cells.values()),
        truth_pairs=sum(_c2(n) for n in truth.values()),
        predicted_pairs=sum(_c2(n) for n in predicted.values()),
    )


def pair_categories(units: Iterable[tuple[Hashable, Hashable, str]]) -> tuple[Counter, Counter]:
    """Missed and false pairs by the category pair of their two units: (missed, false).

    Units are (truth, predicted, category); cells of equal (truth, predicted, category) are
    counted together, so the work is quadratic only in the cells of one cluster.
    """
    cells: Counter = Counter(units)
    by_truth: dict = defaultdict(list)
    by_predicted: dict = defaultdict(list)
    for (t, p, c), n in cells.items():
        by_truth[t].append((p, c, n))
        by_predicted[p].append((t, c, n))
    missed: Counter = Counter()
    false: Counter = Counter()
    for groups, out in ((by_truth, missed), (by_predicted, false)):
        for members in groups.values():
            for i, (other_a, cat_a, n_a) in enumerate(members):
                for other_b, cat_b, n_b in members[i + 1 :]:
                    if other_a != other_b:
                        out[" ~ ".join(sorted((cat_a, cat_b)))] += n_a * n_b
    return missed, false


@dataclass
class Score:
    resources: PairScore
    vulnerabilities: PairScore
    informational_findings: int
    informational_sources: int
    records: int  # labelled records that are not informational
    records_stored: int  # of those, how many have a source in the store
    findings: int
    resources_stored: int
    unlabelled_sources: int
    missed_resource_pairs: Counter = field(default_factory=Counter)
    false_resource_pairs: Counter = field(default_factory=Counter)
    missed_resource_by_machine: Counter = field(default_factory=Counter)
    false_resource_by_machine: Counter = field(default_factory=Counter)
    missed_vuln_pairs: Counter = field(default_factory=Counter)
    false_vuln_pairs: Counter = field(default_factory=Counter)

    @property
    def figures(self) -> dict[str, float]:
        return {
            "resource precision": self.resources.precision,
            "resource recall": self.resources.recall,
            "vulnerability precision": self.vulnerabilities.precision,
            "vulnerability recall": self.vulnerabilities.recall,
        }

    def failures(self, threshold: float = THRESHOLD) -> list[str]:
        """What falls short of the target: empty when the merge is good enough."""
        problems = [
            f"{name} {value:.4f} < {threshold}" for name, value in self.figures.items() if value < threshold
        ]
        if self.informational_findings:
            problems.append(
                f"{self.informational_findings} informational findings "
                f"({self.informational_sources} informational sources)"
            )
        return problems


def score(
    labels: Mapping[tuple[str, str], Label],
    findings: list[dict],
    category_of: Mapping[str, str] | None = None,
) -> Score:
    """Score the findings (read API items with ``sources``) against the fleet's labels.

    ``category_of`` (machine id -> its category) adds a breakdown of resource pairs by the
    categories of the two machines.
    """
    record_resource: dict[tuple[str, str], set] = defaultdict(set)
    unit_finding: dict[tuple, object] = {}
    vendor_keyed: dict[tuple[str, str], set] = defaultdict(set)
    info_findings: set = set()
    info_sources = unlabelled = 0
    resources_seen: set = set()
    for finding in findings:
        resources_seen.add(finding["resourceId"])
        cve = finding["cves"][0] if finding.get("cves") else None
        for source in finding["sources"]:
            key = (source["provider"], source["providerId"])
            label = labels.get(key)
            if label is None:
                unlabelled += 1
                continue
            if label.info:
                info_sources += 1
                info_findings.add(finding["id"])
                continue
            record_resource[key].add(finding["resourceId"])
            if cve is not None and cve in label.vulns:
                unit_finding[(key, cve)] = finding["id"]
            elif len(label.vulns) == 1 and cve is None:
                unit_finding[(key, label.vulns[0])] = finding["id"]
            else:
                vendor_keyed[key].add(finding["id"])
    for key, finding_ids in vendor_keyed.items():
        for vuln in labels[key].vulns:
            unit_finding.setdefault((key, vuln), min(finding_ids))

    resource_units = []
    vuln_units = []
    for key, label in labels.items():
        if label.info:
            continue
        stored = record_resource.get(key)
        predicted = ("resource", min(stored)) if stored else ("missing", key)
        resource_units.append((label.machine, predicted, label.view))
        for vuln in label.vulns:
            found = unit_finding.get((key, vuln))
            vuln_units.append(
                (
                    (label.machine, vuln),
                    ("finding", found) if found is not None else ("missing", key, vuln),
                    label.view,
                )
            )
    missed_r, false_r = pair_categories(resource_units)
    missed_v, false_v = pair_categories(vuln_units)
    by_machine_missed: Counter = Counter()
    by_machine_false: Counter = Counter()
    if category_of is not None:
        by_machine_missed, by_machine_false = pair_categories(
            (t, p, category_of.get(t, "?")) for t, p, _ in resource_units
        )
    return Score(
        resources=pair_score((t, p) for t, p, _ in resource_units),
        vulnerabilities=pair_score((t, p) for t, p, _ in vuln_units),
        informational_findings=len(info_findings),
        informational_sources=info_sources,
        records=len(resource_units),
        records_stored=sum(1 for _, p, _ in resource_units if p[0] == "resource"),
        findings=len(findings),
        resources_stored=len(resources_seen),
        unlabelled_sources=unlabelled,
        missed_resource_pairs=missed_r,
        false_resource_pairs=false_r,
        missed_resource_by_machine=by_machine_missed,
        false_resource_by_machine=by_machine_false,
        missed_vuln_pairs=missed_v,
        false_vuln_pairs=false_v,
    )


def table(rows: dict[str, Score]) -> str:
    """A small text table of scores by run (push order, store)."""
    head = (
        f"{'run':44} {'res P':>7} {'res R':>7} {'vuln P':>7} {'vuln R':>7} {'info':>5} "
        f"{'records':>8} {'findings':>8} {'resources':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(
            f"{name:44} {s.resources.precision:7.4f} {s.resources.recall:7.4f} "
            f"{s.vulnerabilities.precision:7.4f} {s.vulnerabilities.recall:7.4f} "
            f"{s.informational_findings:5d} {s.records:8d} {s.findings:8d} {s.resources_stored:9d}"
        )
    return "\n".join(lines)


def breakdown(s: Score, top: int = 12) -> str:
    """The missed and false pairs by category, largest first."""
    out = [
        f"pairs (true positive / true / predicted): resources {s.resources.tp}/{s.resources.truth_pairs}/"
        f"{s.resources.predicted_pairs}, vulnerabilities {s.vulnerabilities.tp}/"
        f"{s.vulnerabilities.truth_pairs}/{s.vulnerabilities.predicted_pairs}; "
        f"informational findings {s.informational_findings}"
    ]
    for title, counter in (
        ("missed resource pairs by machine category", s.missed_resource_by_machine),
        ("false resource pairs by machine categories", s.false_resource_by_machine),
        ("missed resource pairs by host-record views", s.missed_resource_pairs),
        ("false resource pairs by host-record views", s.false_resource_pairs),
        ("missed vulnerability pairs by views", s.missed_vuln_pairs),
        ("false vulnerability pairs by views", s.false_vuln_pairs),
    ):
        total = sum(counter.values())
        out.append(f"{title}: {total}")
        for name, count in counter.most_common(top):
            out.append(f"  {count:8d}  {name}")
    return "\n".join(out)


def run(database_url: str | None, hosts: int, seed: int, orders: list[str]) -> dict[str, Score]:
    """Generate, push in each order into a fresh tenant, and score."""
    import logging
    import tempfile
    from pathlib import Path

    from gateway import create_app
    from gateway.migrate import upgrade
    from tests.fleet.generate import generate
    from tests.fleet.pipeline import ORDERS, Pusher

    fleet = generate(seed, hosts)
    labels = fleet.labels
    categories = {m.id: m.category for m in fleet.machines.values()}
    with tempfile.TemporaryDirectory() as scratch:
        url = database_url or f"sqlite:///{Path(scratch) / 'fleet.sqlite3'}"
        upgrade(url)
        app = create_app(
            {
                "DATABASE_URL": url,
                "SECRET_KEY": "fleet-score",
                "TASK_ALWAYS_EAGER": True,
                "BROKER_URL": "memory://",
                "MERGE_CHUNK_SIZE": 500,
            }
        )
        for noisy in ("celery", "kombu"):  # a task line per push: the table is what this prints
            logging.getLogger(noisy).setLevel(logging.ERROR)
        pusher = Pusher(app)
        results = {}
        try:
            for name in orders:
                tenant, headers = pusher.push_fleet(fleet, ORDERS[name])
                results[name] = score(labels, pusher.read(tenant, headers, "findings"), categories)
        finally:
            app.extensions["gateway.db"].dispose()
    return results


def _on_fresh_postgres(admin_url: str, work):
    import os
    import uuid

    import psycopg

    name = f"fleet_score_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        return work("postgresql+psycopg://" + admin_url.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    from tests.fleet.pipeline import ORDERS

    parser = argparse.ArgumentParser(
        description="Score the merge's identity resolution on a generated fleet."
    )
    parser.add_argument("--hosts", type=int, default=250)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--order", default="all", help=f"one of {', '.join(ORDERS)}, or all")
    parser.add_argument(
        "--database-url", help="a store to push into (migrated first; default: a fresh SQLite file)"
    )
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        nargs="?",
        const="postgresql://postgres@127.0.0.1:5432/postgres",
        help="push into a fresh PostgreSQL database created (and dropped) through ADMIN_URL",
    )
    parser.add_argument("--breakdown", action="store_true", help="missed/false pairs by category")
    args = parser.parse_args(argv)
    orders = list(ORDERS) if args.order == "all" else [args.order]
    started = time.monotonic()
    if args.postgres:
        results = _on_fresh_postgres(args.postgres, lambda url: run(url, args.hosts, args.seed, orders))
    else:
        results = run(args.database_url, args.hosts, args.seed, orders)
    print(table(results))
    print(
        f"({args.hosts} hosts, seed {args.seed}, {time.monotonic() - started:.1f}s; target >= {THRESHOLD}, "
        "0 informational findings)"
    )
    if args.breakdown:
        for name, result in results.items():
            print(f"\n== {name}\n{breakdown(result)}")
    return 1 if any(result.failures() for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
