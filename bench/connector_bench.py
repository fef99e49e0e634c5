"""Connector benchmark: records/s and peak memory per format, streaming, and end to end.

    .venv/bin/python bench/connector_bench.py            # everything (writes and deletes a 1 GB file)
    .venv/bin/python bench/connector_bench.py --quick    # without the 1 GB Nessus file

1. Per format: records/s parsed and normalized (the connector's ``parse`` consumed to the
   end) and the peak RSS above the process's own baseline, on the largest real sample of
   that format in ../shared/samples and on a synthetic file of about ``--records`` records
   made by repeating that sample's record units (XML host/VULN elements, JSON array items,
   CSV data rows).  Each run is a fresh subprocess, so its VmHWM is that run's peak.
2. Nessus streaming: synthetic Nessus v2 files of 10 MB and 1 GB (written to a temporary
   directory and deleted afterwards) parsed from disk with peak RSS: flat memory means the
   1 GB file peaks about where the 10 MB one does.
3. End to end: a ``--e2e-findings`` Nessus file pushed over HTTP to the gateway on a
   scratch PostgreSQL database, Redis and ``--workers`` celery worker processes, timed
   until its batch is merged (machinery from bench/ingest_bench.py); then a Tenable.io
   export of ``--e2e-findings`` records over ``--e2e-assets`` assets pushed into a store that
   already holds those assets as resources (a first export of one record per asset), which
   is where identity resolution works hardest: every asset is a candidate.

Figures only, no assertions.  The machine may be shared: repeat a run before trusting it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import connectors  # noqa: E402
from connectors.base import ParseOptions  # noqa: E402
from connectors.model import Rejected  # noqa: E402

SAMPLES = Path(os.environ.get("GATEWAY_SAMPLES", ROOT.parent / "shared" / "samples"))
# XML formats: the element repeated to grow a file (a unit holds records, the rest is kept once)
XML_UNITS = {"nessus": "ReportHost", "qualys_hld": "HOST", "qualys_scan_xml": "HOST", "qualys_kb": "VULN"}
JSON_ENVELOPES = ("findings", "Findings", "value")


# -- per-format measurement (one subprocess per run) --------------------------------------


def measure(format_name: str, path: Path) -> dict:
    """Parse ``path`` with the connector in this process: records, seconds, peak RSS delta."""
    baseline = _rss_now_kib()
    connector = connectors.get(format_name)
    started = time.perf_counter()
    records = rejected = 0
    with path.open("rb") as stream:
        for record in connector.parse(stream, ParseOptions(provider="Bench")):
            records += 1
            rejected += isinstance(record, Rejected)
    seconds = time.perf_counter() - started
    peak = _rss_now_kib("VmHWM:")  # this exec's high-water mark (ru_maxrss survives fork+exec)
    return {"records": records, "rejected": rejected, "seconds": seconds,
            "peak_mib": (peak - baseline) / 1024, "size_mib": path.stat().st_size / 2**20}


def _rss_now_kib(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def run_isolated(format_name: str, path: Path) -> dict:
    """``measure`` in a fresh interpreter, so its peak RSS is this run's alone."""
    output = subprocess.run([sys.executable, __file__, "--measure", format_name, str(path)],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(output.stdout.strip().splitlines()[-1])


# -- sample selection and synthetic growth -------------------------------------------------


def largest_samples() -> dict[str, Path]:
    """The largest sample file each registered connector parses without a FormatError."""
    best: dict[str, Path] = {}
    for path in sorted(SAMPLES.rglob("*")):
        if not path.is_file() or path.name == "MANIFEST.tsv":
            continue
        head = path.read_bytes()[:65536]
        for name in connectors.formats():
            if not connectors.get(name).sniff(head):
                continue
            try:
                records = connectors.get(name).parse(io.BytesIO(path.read_bytes()), ParseOptions())
                count = sum(1 for _ in records)
            except Exception:  # noqa: BLE001 - a sample the connector refuses is not a candidate
                continue
            if count and (name not in best or path.stat().st_size > best[name].stat().st_size):
                best[name] = path
    return best


def built_samples(scratch: Path) -> dict[str, Path]:
    """Inputs for formats whose real samples are wrapped or missing (labelled "built", not "sample").

    asc_assessment: the body of the ListAssessments REST example (the samples are API
    examples, the body is under responses.200.body); canonical (the gateway's own format)
    and graph_alert (no Graph alert file among the samples): small documents built here.
    """
    from tests.factories import document, finding

    built = {}
    example_path = SAMPLES / "azure_defender_rest" / "2021-06-01_ListAssessments_example.json"
    example = json.loads(example_path.read_text())
    built["asc_assessment"] = scratch / "asc_list.json"
    built["asc_assessment"].write_text(json.dumps(example["responses"]["200"]["body"]))
    built["canonical"] = scratch / "canonical.json"
    built["canonical"].write_bytes(document([finding(f"f-{i}", host=f"h{i % 7}.example.com",
                                                     cves=[f"CVE-2024-{1000 + i}"]) for i in range(20)]))
    alert = {"id": "alert-1", "title": "Suspicious sign-in", "severity": "high", "status": "newAlert",
             "category": "CredentialAccess", "createdDateTime": "2024-04-01T10:00:00Z",
             "lastModifiedDateTime": "2024-04-01T11:00:00Z", "recommendedActions": ["Reset the password"],
             "hostStates": [{"fqdn": "web-1.contoso.com"}],
             "vendorInformation": {"provider": "Contoso", "vendor": "Contoso"}}
    built["graph_alert"] = scratch / "graph_alerts.json"
    built["graph_alert"].write_text(json.dumps({"value": [dict(alert, id=f"alert-{i}") for i in range(20)]}))
    return built


def grow(format_name: str, sample: Path, records: int, target: Path) -> Path:
    """Write a file of about ``records`` records by repeating the sample's record units."""
    data = sample.read_bytes()
    per_copy = max(1, sum(1 for _ in connectors.get(format_name).parse(io.BytesIO(data), ParseOptions())))
    copies = max(1, records // per_copy)
    if format_name in XML_UNITS:
        _grow_xml(data, XML_UNITS[format_name], copies, target)
    elif connectors.get(format_name).CONTENT_TYPES[0].endswith("json"):
        _grow_json(data, copies, target)
    else:
        _grow_csv(data, copies, target)
    return target


def _grow_xml(data: bytes, tag: str, copies: int, target: Path) -> None:
    text = data.decode("utf-8", "replace")
    start = re.search(rf"<{tag}[\s>]", text).start()
    end = text.rindex(f"</{tag}>") + len(f"</{tag}>")
    unit = text[start:end]
    with target.open("w", encoding="utf-8") as out:
        out.write(text[:start])
        for n in range(copies):  # one name per copy keeps the hosts (and provider ids) apart
            out.write(unit.replace("<IP>", f"<IP>10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}<!--")
                      .replace("</IP>", "--></IP>") if tag == "HOST" else
                      re.sub(r'<ReportHost name="([^"]*)"', rf'<ReportHost name="h{n}-\1"', unit)
                      if tag == "ReportHost" else re.sub(r"<QID>(\d+)</QID>", rf"<QID>\g<1>{n}</QID>", unit))
        out.write(text[end:])


def _grow_json(data: bytes, copies: int, target: Path) -> None:
    document = json.loads(data.decode("utf-8-sig"))
    if isinstance(document, list):
        items, wrap = document, (lambda body: body)
    else:
        key = next((k for k in JSON_ENVELOPES if isinstance(document.get(k), list)), None)
        if key is None and isinstance(document.get("response"), dict):  # Tenable.sc analysis page
            items = document["response"]["results"]
            def wrap(body):
                return dict(document, response=dict(document["response"], results=body))
        elif key is None:
            items, wrap = [document], (lambda body: body)
        else:
            items, wrap = document[key], (lambda body, key=key: dict(document, **{key: body}))
    target.write_text(json.dumps(wrap(items * copies)))


def _grow_csv(data: bytes, copies: int, target: Path) -> None:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig", "replace"))))
    width = len(rows[-1])
    header = next(i for i, row in enumerate(rows) if len(row) == width)
    body = [row for row in rows[header + 1 :] if len(row) == width]
    with target.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerows(rows[: header + 1])
        for _ in range(copies):
            writer.writerows(body)


def synthetic_nessus(target: Path, size: int | None = None, findings: int | None = None,
                     items_per_host: int = 100) -> int:
    """A Nessus v2 file of about ``size`` bytes or ``findings`` ReportItems; returns the item count."""
    item = ('<ReportItem port="{port}" svc_name="www" protocol="tcp" severity="{sev}" pluginID="{plugin}" '
            'pluginName="Synthetic plugin {plugin}" pluginFamily="Web Servers">'
            "<cve>CVE-2024-{cve}</cve><cvss3_base_score>7.5</cvss3_base_score>"
            "<cvss3_vector>CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N</cvss3_vector>"
            "<description>A synthetic vulnerability for the benchmark: the service answers with "
            "a version known to be affected.</description><solution>Upgrade the service.</solution>"
            "<plugin_output>Installed version : 2.4.{port}</plugin_output></ReportItem>\n")
    count = host = 0
    written = 0
    with target.open("w", encoding="ascii") as out:
        out.write('<?xml version="1.0" ?>\n<NessusClientData_v2><Report name="bench">\n')
        while (size is None or written < size) and (findings is None or count < findings):
            parts = [f'<ReportHost name="10.{host // 65536 % 256}.{host // 256 % 256}.{host % 256}">'
                     f'<HostProperties><tag name="host-fqdn">host{host}.bench.example.com</tag>'
                     f'<tag name="host-ip">10.{host // 65536 % 256}.{host // 256 % 256}.{host % 256}</tag>'
                     '<tag name="HOST_END_TIMESTAMP">1711929600</tag></HostProperties>\n']
            for n in range(items_per_host):
                if findings is not None and count >= findings:
                    break
                parts.append(item.format(port=n, sev=1 + n % 4, plugin=100000 + n, cve=10000 + n))
                count += 1
            parts.append("</ReportHost>\n")
            chunk = "".join(parts)
            out.write(chunk)
            written += len(chunk)
            host += 1
        out.write("</Report></NessusClientData_v2>\n")
    return count


# -- end to end ----------------------------------------------------------------------------


def synthetic_tenable_io(path: Path, records: int, assets: int, seed: int = 7) -> int:
    """A Tenable.io export of ``records`` vulnerabilities spread over ``assets`` assets."""
    import random

    rng = random.Random(seed)
    with path.open("w") as out:
        out.write("[")
        for n in range(records):
            a = n % assets
            item = {
                "asset": {"uuid": f"{a:08x}-0000-4000-8000-{a:012x}", "hostname": f"host-{a}",
                          "fqdn": f"host-{a}.corp.example.com", "ipv4": f"10.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}",
                          "mac_address": f"00:50:56:{a >> 16 & 255:02x}:{a >> 8 & 255:02x}:{a & 255:02x}",
                          "network_id": "00000000-0000-0000-0000-000000000000",
                          "operating_system": ["Linux Kernel 5.15"]},
                "plugin": {"id": 100000 + n // assets, "name": f"Synthetic vulnerability {n // assets}",
                           "cve": [f"CVE-2024-{10000 + n // assets}"], "description": "A description.",
                           "solution": "Upgrade.", "cvss3_base_score": round(rng.uniform(4, 10), 1)},
                "port": {"port": 443, "protocol": "TCP"}, "severity": "high", "severity_id": 3,
                "state": "OPEN", "output": f"output {n}", "first_found": "2024-03-01T00:00:00Z",
                "last_found": "2024-04-01T00:00:00Z", "indexed": "2024-04-01T00:00:00Z",
            }
            out.write(("," if n else "") + json.dumps(item))
        out.write("]")
    return records


def end_to_end(
    findings: int, workers: int, scratch: Path, assets: int = 50_000, nessus_only: bool = False
) -> None:
    """Push one ``findings``-item Nessus file over HTTP; time until its batch is merged.
    Then a Tenable.io export into a store of ``assets`` resources (see the module docstring).
    ``nessus_only``: the new Nessus push alone (no Tenable.io export, no re-push)."""
    import redis
    import requests
    from werkzeug.serving import make_server

    from bench.ingest_bench import REDIS, create_database, drop_database
    from gateway import create_app
    from gateway.migrate import upgrade
    from tests.conftest import Gateway

    path = scratch / "e2e.nessus"
    count = synthetic_nessus(path, findings=findings)
    body = path.read_bytes()
    name, url = create_database("gw_cbench")
    queue = f"cbench-{uuid.uuid4().hex[:6]}"
    processes = []
    try:
        upgrade(url)
        app = create_app({"DATABASE_URL": url, "BROKER_URL": REDIS, "SECRET_KEY": "bench",
                          "TASK_QUEUE": queue})
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        env = dict(os.environ, GATEWAY_DATABASE_URL=url, GATEWAY_BROKER_URL=REDIS, GATEWAY_SECRET_KEY="bench",
                   GATEWAY_TASK_QUEUE=queue, PYTHONPATH=str(ROOT))
        for n in range(workers):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--concurrency=1",
                 "--loglevel=WARNING", "--without-gossip", "--without-mingle", "-n", f"cbench{n}@%h"],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(3)
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = gw.partner("Tenable", [tenant])
        def timed(format_name: str, content: bytes, content_type: str, tenant: str, headers: dict) -> tuple:
            started = time.perf_counter()
            response = requests.post(f"{base}/api/v1/tenants/{tenant}/batches?format={format_name}",
                                     data=content, headers=headers | {"Content-Type": content_type}, timeout=600)
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]
            while True:
                time.sleep(0.2)
                batch = requests.get(f"{base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers,
                                     timeout=30).json()
                if batch["status"] not in ("accepted", "processing"):
                    return batch, time.perf_counter() - started

        if not nessus_only:
            io_tenant = gw.tenant()
            io_headers = gw.partner("Tenable", [io_tenant])
            seed_path, push_path = scratch / "seed.json", scratch / "push.json"
            synthetic_tenable_io(seed_path, assets, assets)
            batch, seconds = timed("tenable_io", seed_path.read_bytes(), "application/json", io_tenant,
                                   io_headers)
            print(f"e2e tenable_io seed: {assets} assets as resources, {batch['status']} "
                  f"after {seconds:.1f}s")
            io_count = synthetic_tenable_io(push_path, findings, assets, seed=8)
            io_body = push_path.read_bytes()
            batch, seconds = timed("tenable_io", io_body, "application/json", io_tenant, io_headers)
            print(f"e2e tenable_io push: {io_count} records over {assets} known assets, "
                  f"{len(io_body) / 2**20:.0f} MiB, {workers} workers: {batch['status']} "
                  f"after {seconds:.1f}s = "
                  f"{io_count / seconds:,.0f} records/s; counts {batch['counts']}")

        for attempt in ("new",) if nessus_only else ("new", "no-change re-push"):
            started = time.perf_counter()
            response = requests.post(f"{base}/api/v1/tenants/{tenant}/batches?format=nessus", data=body,
                                     headers=headers | {"Content-Type": "application/xml"}, timeout=600)
            accepted = time.perf_counter() - started
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]
            while True:
                time.sleep(0.2)
                batch = requests.get(f"{base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers,
                                     timeout=30).json()
                if batch["status"] not in ("accepted", "processing"):
                    break
            total = time.perf_counter() - started
            print(f"e2e nessus {attempt:>17}: {count} findings, {len(body) / 2**20:.0f} MiB, "
                  f"{workers} workers: "
                  f"202 after {accepted:.1f}s, {batch['status']} after {total:.1f}s = {count / total:,.0f} "
                  f"findings/s; counts {batch['counts']}")
        server.shutdown()
        app.extensions["gateway.db"].dispose()
        redis.Redis.from_url(REDIS).delete(queue)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        drop_database(name)


# -- main ------------------------------------------------------------------------------------


def _line(label: str, fmt: str, result: dict) -> str:
    rate = result["records"] / result["seconds"] if result["seconds"] else 0
    return (f"{label:<10} {fmt:<16} {result['size_mib']:>8.1f} MiB {result['records']:>9} records "
            f"({result['rejected']:>5} rejected) {rate:>10,.0f} rec/s  "
            f"peak RSS +{result['peak_mib']:>7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 1 GB Nessus file")
    parser.add_argument("--records", type=int, default=100_000, help="records per synthetic file")
    parser.add_argument("--e2e-findings", type=int, default=100_000)
    parser.add_argument("--e2e-assets", type=int, default=50_000, help="resources already stored (Tenable.io)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--only-e2e", action="store_true", help="only the end-to-end Nessus push")
    parser.add_argument("--nessus-only", action="store_true",
                        help="end to end: the new Nessus push alone (no Tenable.io export, no re-push)")
    parser.add_argument("--measure", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    with tempfile.TemporaryDirectory(prefix="connector-bench-") as scratch_name:
        scratch = Path(scratch_name)
        if args.only_e2e:
            end_to_end(args.e2e_findings, args.workers, scratch, args.e2e_assets, args.nessus_only)
            return
        print(f"# samples: {SAMPLES}; {os.cpu_count()} CPUs; one fresh process per run")
        inputs = {fmt: ("sample", path) for fmt, path in largest_samples().items()}
        inputs.update({fmt: ("built", path) for fmt, path in built_samples(scratch).items()})
        for fmt, (kind, sample) in sorted(inputs.items()):
            where = sample.relative_to(SAMPLES) if kind == "sample" else "built by the benchmark"
            print(_line(kind, fmt, run_isolated(fmt, sample)) + f"  ({where})")
            grown = grow(fmt, sample, args.records, scratch / f"synthetic-{fmt}{sample.suffix}")
            print(_line("synthetic", fmt, run_isolated(fmt, grown)))
            grown.unlink()
        sizes = [("10 MB", 10 * 10**6)] + ([] if args.quick else [("1 GB", 10**9)])
        for label, size in sizes:
            path = scratch / "big.nessus"
            synthetic_nessus(path, size=size)
            print(_line(f"nessus {label}", "nessus", run_isolated("nessus", path)))
            path.unlink()
        if not args.skip_e2e:
            end_to_end(args.e2e_findings, args.workers, scratch, args.e2e_assets, args.nessus_only)


if __name__ == "__main__":
    main()
