"""Large synthetic scanner files made on the fly, for streaming tests and benchmarks (never held whole)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

_ITEM = (
    '<ReportItem port="{port}" svc_name="www" protocol="tcp" severity="{sev}" pluginID="{plugin}" '
    'pluginName="Synthetic plugin {plugin}" pluginFamily="Web Servers">'
    "<cve>CVE-2024-{cve}</cve><cvss3_base_score>7.5</cvss3_base_score>"
    "<cvss3_vector>CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N</cvss3_vector>"
    "<description>A synthetic vulnerability: the service answers with a version known to be "
    "affected.</description><solution>Upgrade the service.</solution>"
    "<plugin_output>Installed version : 2.4.{port}</plugin_output></ReportItem>\n"
)
HEADER = b'<?xml version="1.0" ?>\n<NessusClientData_v2><Report name="synthetic">\n'
FOOTER = b"</Report></NessusClientData_v2>\n"


def nessus_hosts(
    size: int | None = None, findings: int | None = None, items_per_host: int = 100
) -> Iterator[bytes]:
    """A Nessus v2 document of about ``size`` bytes or exactly ``findings`` ReportItems, one host a chunk.

    The same arguments give the same bytes; each host has ``items_per_host`` findings.
    """
    yield HEADER
    written = count = host = 0
    while (size is None or written < size) and (findings is None or count < findings):
        address = f"10.{host // 65536 % 256}.{host // 256 % 256}.{host % 256}"
        parts = [
            f'<ReportHost name="{address}"><HostProperties>'
            f'<tag name="host-fqdn">host{host}.synthetic.example.com</tag>'
            f'<tag name="host-ip">{address}</tag>'
            '<tag name="HOST_END_TIMESTAMP">1711929600</tag></HostProperties>\n'
        ]
        for n in range(items_per_host):
            if findings is not None and count >= findings:
                break
            parts.append(_ITEM.format(port=n, sev=1 + n % 4, plugin=100000 + n, cve=10000 + n))
            count += 1
        parts.append("</ReportHost>\n")
        chunk = "".join(parts).encode("ascii")
        written += len(chunk)
        host += 1
        yield chunk
    yield FOOTER


def nessus_file(target: Path, size: int | None = None, findings: int | None = None) -> int:
    """Write :func:`nessus_hosts` to ``target``; return its size in bytes."""
    total = 0
    with target.open("wb") as out:
        for chunk in nessus_hosts(size, findings):
            out.write(chunk)
            total += len(chunk)
    return total


def nessus_size(size: int | None = None, findings: int | None = None) -> int:
    """The byte length of :func:`nessus_hosts` with these arguments (for a Content-Length)."""
    return sum(len(chunk) for chunk in nessus_hosts(size, findings))
