"""Cost per MB of the pre-202 well-formedness pass (gateway.ingest.check_xml and msgspec.Raw).

    .venv/bin/python -m bench.wellformed
"""

from __future__ import annotations

import time

import msgspec

from gateway.ingest import check_xml
from tests.factories import document, finding


def _nessus(hosts: int, items: int) -> bytes:
    parts = [b'<?xml version="1.0" ?>\n<NessusClientData_v2><Report name="r">']
    for h in range(hosts):
        parts.append(f'<ReportHost name="10.0.{h // 256}.{h % 256}"><HostProperties>'
                     f'<tag name="host-fqdn">h{h}.example.com</tag></HostProperties>'.encode())
        for i in range(items):
            parts.append(f'<ReportItem port="443" svc_name="www" protocol="tcp" severity="2" pluginID="{i}" '
                         f'pluginName="Plugin {i}"><description>A description of plugin {i}.</description>'
                         f'<solution>Upgrade.</solution><cve>CVE-2024-{i:04d}</cve>'
                         f'<plugin_output>output {h} {i}</plugin_output></ReportItem>'.encode())
        parts.append(b"</ReportHost>")
    parts.append(b"</Report></NessusClientData_v2>")
    return b"".join(parts)


def _time(fn, body: bytes, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(body)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    xml = _nessus(400, 250)
    js = document([finding(f"q-{i}", host=f"h{i % 500}.example.com") for i in range(120_000)])
    for name, body, fn in (("XML (lxml XMLPullParser)", xml, check_xml),
                           ("JSON (msgspec.Raw)", js, lambda b: msgspec.json.decode(b, type=msgspec.Raw))):
        seconds = _time(fn, body)
        mb = len(body) / 1e6
        print(f"{name}: {mb:.1f} MB in {seconds * 1000:.0f} ms = {seconds * 1000 / mb:.2f} ms/MB")


if __name__ == "__main__":
    main()
