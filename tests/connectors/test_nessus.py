import io
import time
import tracemalloc
from collections import Counter
from datetime import UTC, datetime

import pytest

import connectors
from connectors._tenable import parse_any_time
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from tests.connectors.conftest import parse_all


def _doc(*hosts: str, prolog: str = '<?xml version="1.0" ?>') -> bytes:
    body = "".join(hosts)
    return f'{prolog}\n<NessusClientData_v2><Report name="t">{body}</Report></NessusClientData_v2>'.encode()


def _host(name: str, *items: str, tags: dict[str, str] | None = None) -> str:
    props = "".join(f'<tag name="{k}">{v}</tag>' for k, v in (tags or {}).items())
    return f'<ReportHost name="{name}"><HostProperties>{props}</HostProperties>{"".join(items)}</ReportHost>'


def _item(
    plugin_id: str | None = "19506", port: str = "443", severity: str | None = "3",
    body: str = "",
) -> str:
    attrs = f'port="{port}" svc_name="www" protocol="tcp" pluginName="Plugin {plugin_id}"'
    if plugin_id is not None:
        attrs += f' pluginID="{plugin_id}"'
    if severity is not None:
        attrs += f' severity="{severity}"'
    return f"<ReportItem {attrs}>{body}</ReportItem>"


def _records(path) -> list:
    return parse_all("nessus", path.read_bytes())


# ---- zero, one, many ----------------------------------------------------------------


def test_host_without_items_yields_nothing(sample):
    assert _records(sample("nessus_v2_xml/nessus_was_no_vuln.xml")) == []


def test_report_without_hosts_yields_nothing():
    assert parse_all("nessus", _doc()) == []
    policy_only = b"<NessusClientData_v2><Policy><policyName/></Policy></NessusClientData_v2>"
    assert parse_all("nessus", policy_only) == []


def test_one_web_app_finding(sample):
    [record] = _records(sample("nessus_v2_xml/nessus_was_one_vuln.xml"))
    assert isinstance(record, FindingRecord)
    assert record.title == "Cross-Site Scripting (XSS)"
    assert record.vendor_id == "98104"
    assert record.severity == "high"
    assert (record.severity_original, record.severity_scale) == ("3", "nessus 0-4")
    assert record.resource.kind == "web_app"
    assert record.resource.name == "http://google.com/"
    assert record.resource.fqdn == "google.com"
    assert record.provider_id == "http://google.com/|98104|80/tcp"
    assert record.cvss_score == 7.1  # <cvssv3> preferred to <cvss> 7.5
    assert record.last_seen == datetime(2021, 3, 12, 14, 35, 34, 341269, tzinfo=UTC)
    assert record.references[0] == "http://projects.webappsec.org/w/page/13246920/Cross%20Site%20Scripting"
    assert "xss_9676200" in record.evidence
    assert record.remediation.startswith("To remedy XSS vulnerabilities")
    assert record.extra["cwe"] == ["79"]
    assert record.status == "open"


def test_one_finding_with_cves_and_policy(sample):
    [record] = _records(sample("nessus_v2_xml/nessus_with_cwe-.nessus"))
    assert record.title == "PHP 5.x < 5.2 Multiple Vulnerabilities"
    assert record.severity == "high"
    assert len(record.cves) == 15
    assert record.cves[:2] == ["CVE-2006-1015", "CVE-2006-1549"]
    assert record.cvss_score == 7.5
    assert record.cvss_vector == "AV:N/AC:L/Au:N/C:P/I:P/A:P"  # v2: bare, "CVSS2#" dropped
    assert record.resource.fqdn == "testphp.vulnweb.com"
    assert record.resource.ipv4 == ["44.228.249.3"]
    assert record.resource.os == "Linux Kernel 2.6"
    # HOST_END is the scanner's local time ("15:07:52"); HOST_END_TIMESTAMP is the truth.
    assert record.last_seen == datetime(2022, 3, 23, 14, 7, 52, tzinfo=UTC)
    assert record.provider_id == "testphp.vulnweb.com|31649|80/tcp"


def test_many_from_an_agent_scan(sample):
    everything = _records(sample("nessus_v2_xml/pytenable_example.nessus"))
    assert len(everything) == 230
    records = [r for r in everything if isinstance(r, FindingRecord)]
    observations = [r for r in everything if isinstance(r, Observation)]
    assert (len(records), len(observations)) == (95, 135)  # severity 0 items are observations
    assert Counter(r.severity for r in records) == {"high": 77, "medium": 9, "critical": 7, "low": 2}
    assert {r.scan for r in everything} == {"Test Agent Scan"}
    resource = records[0].resource
    assert resource.agent_id == "22633c46-e142-4c6c-912c-271b15810d47"  # host-uuid
    assert resource.fqdn == "adam.ad.demo.io"
    assert resource.mac == "00:50:56:a6:60:bc"
    assert resource.ipv4 == ["192.168.16.133"]
    assert resource.os == "Microsoft Windows 10 Pro"
    assert resource.host_key == "adam"  # the ReportHost name: provenance
    assert resource.hostname == "ADAM"  # plugin 55472 Device Hostname
    assert len({r.provider_id for r in everything}) == 230
    word = next(r for r in records if r.vendor_id == "108976")
    assert word.provider_id == "22633c46-e142-4c6c-912c-271b15810d47|108976|445/tcp"
    assert word.title == "Security Updates for Microsoft Word Products (April 2018)"
    assert word.cves == ["CVE-2018-0950"]
    assert word.cvss_score == 4.3
    assert word.cvss_vector == "CVSS:3.0/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:N/A:N"
    assert word.remediation.startswith("Microsoft has released the following security updates")
    assert "WinWord.exe has not been patched" in word.evidence
    assert word.last_seen == datetime(2018, 9, 14, 3, 41, 35, tzinfo=UTC)
    assert word.references == [
        "http://www.nessus.org/u?e9236b3d", "http://www.nessus.org/u?ca11752e",
        "http://www.nessus.org/u?1213962f", "http://www.nessus.org/u?124b2a7c",
    ]
    assert sum(len(r.cves) for r in records) == 771  # 5 CVEs are on severity 0 items: observations


def test_many_hosts(sample):
    everything = _records(sample("nessus_v2_xml/nessus_v_unknown.xml"))
    assert len(everything) == 296
    records = [r for r in everything if isinstance(r, FindingRecord)]
    assert Counter(r.severity for r in records) == {"medium": 23, "low": 7}
    observations = [r for r in everything if isinstance(r, Observation)]
    assert len(observations) == 266
    assert Counter(o.category for o in observations) == {
        "other": 92, "service": 87, "port": 38, "identity": 21, "os": 14, "software": 7, "network": 7,
    }
    by_host = Counter(r.resource.hostname for r in everything)
    assert len(by_host) == 7 and by_host["qa3app02"] == 45
    rdp = next(r for r in records if r.cves)
    assert rdp.provider_id == "qa3app09|18405|3389/tcp"
    assert rdp.title == "Microsoft Windows Remote Desktop Protocol Server Man-in-the-Middle Weakness"
    assert rdp.cves == ["CVE-2005-1794"]
    assert (rdp.severity, rdp.cvss_score) == ("medium", 5.1)
    # a host-fqdn without a dot is a host name, not an FQDN
    assert (rdp.resource.fqdn, rdp.resource.hostname) == (None, "qa3app09")
    assert rdp.resource.netbios == "QA3APP09"
    assert rdp.resource.mac == "00:50:56:81:01:e3"
    assert rdp.resource.ipv4 == ["10.31.112.29"]
    assert rdp.last_seen == datetime(2013, 7, 1, 11, 40, 48, tzinfo=UTC)  # "Mon Jul  1 11:40:48 2013"


def test_repeated_plugin_on_one_port_is_one_record(sample):
    records = _records(sample("nessus_v2_xml/nessus_with_cvssv3.nessus"))
    assert len(records) == 48  # 49 ReportItems, plugin 58987 twice on 80/tcp
    assert Counter(type(r).__name__ for r in records) == {"FindingRecord": 25, "Observation": 23}
    assert len({r.provider_id for r in records}) == 48
    php = next(r for r in records if r.vendor_id == "58987")
    assert "PHP/5.6.40" in php.evidence and "Installed version : 5.1.6" in php.evidence
    assert (php.severity, php.cvss_score) == ("critical", 10.0)
    assert php.cvss_vector == "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H"


def test_provider_ids_are_stable_across_pushes(sample):
    data = sample("nessus_v2_xml/nessus_v_unknown.xml").read_bytes()
    first = [r.provider_id for r in parse_all("nessus", data)]
    assert first == [r.provider_id for r in parse_all("nessus", data)]
    one = _host("10.0.0.9", _item("1", "22"), _item("2", "80"), tags={"host-fqdn": "db.example.com"})
    other_order = _host("10.0.0.9", _item("2", "80"), _item("1", "22"), tags={"host-fqdn": "db.example.com"})
    ids = sorted(r.provider_id for r in parse_all("nessus", _doc(one)))
    assert ids == sorted(r.provider_id for r in parse_all("nessus", _doc(other_order)))
    assert ids == ["db.example.com|1|22/tcp", "db.example.com|2|80/tcp"]


# ---- field mapping details ----------------------------------------------------------


def test_tenable_io_fields_and_host_identifiers():
    body = (
        "<vulnerability_state>Fixed</vulnerability_state>"
        "<first_found>2024-01-02T03:04:05Z</first_found><last_found>2024-02-03T04:05:06Z</last_found>"
        "<cve>CVE-2024-3094</cve><cvss3_base_score>10.0</cvss3_base_score>"
        "<cvss3_vector>CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H</cvss3_vector>"
        "<see_also>https://a.example\nhttps://b.example</see_also><solution>n/a</solution>"
    )
    tags = {
        "tenable-uuid": "0B5A1D8E9F2C4D3E8A7B6C5D4E3F2A1B",
        "host-fqdn": "DB-1.Example.com",
        "netbios-name": "WORKGROUP\\DB-1",
        "mac-address": "not-a-mac\n00-50-56-A6-60-BC\n00:50:56:a6:60:bd",
        "host-ip": "2001:db8::5",
        "operating-system": "Linux Kernel 6.1\nLinux Kernel 6.2",
        "HOST_END": "Thu Jun 22 11:33:59 2017",
    }
    [record] = parse_all("nessus", _doc(_host("db-1", _item("4242", "0", "4", body), tags=tags)))
    assert record.status == "fixed"
    assert record.first_seen == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert record.last_seen == datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2017, 6, 22, 11, 33, 59, tzinfo=UTC)
    assert record.severity == "critical"
    assert record.cves == ["CVE-2024-3094"]
    assert record.cvss_vector == "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H"
    assert record.references == ["https://a.example", "https://b.example"]
    assert record.remediation is None
    resource = record.resource
    assert resource.agent_id == "0b5a1d8e-9f2c-4d3e-8a7b-6c5d4e3f2a1b"
    assert resource.fqdn == "DB-1.Example.com"
    assert resource.hostname is None  # the name attribute is only a fallback
    assert resource.netbios == "DB-1"
    assert resource.mac == "00:50:56:a6:60:bc"
    assert resource.ipv6 == ["2001:db8::5"] and resource.ipv4 == []
    assert resource.os == "Linux Kernel 6.1"
    assert record.provider_id == "0b5a1d8e-9f2c-4d3e-8a7b-6c5d4e3f2a1b|4242|0/tcp"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10.1.2.3", {"ipv4": ["10.1.2.3"], "key": "10.1.2.3"}),
        ("web01.corp.example", {"fqdn": "web01.corp.example", "key": "web01.corp.example"}),
        ("web01", {"hostname": "web01", "key": "web01"}),
    ],
)
def test_report_host_name_is_the_fallback_identifier(name, expected):
    [record] = parse_all("nessus", _doc(_host(name, _item("10", "0"))))
    for attr in ("ipv4", "fqdn", "hostname"):
        if attr in expected:
            assert getattr(record.resource, attr) == expected[attr]
    assert record.provider_id == f"{expected['key']}|10|0/tcp"
    assert record.last_seen is None


def test_severity_falls_back_to_risk_factor_then_cvss():
    items = (
        _item("1", severity=None, body="<risk_factor>High</risk_factor>"),
        _item("2", severity="9", body="<cvss_base_score>5.0</cvss_base_score>"),
        _item("3", severity=None),
    )
    first, second, third = parse_all("nessus", _doc(_host("10.0.0.1", *items)))
    assert (first.severity, first.severity_original) == ("high", "High")
    assert first.severity_scale == "tenable risk factor"
    assert (second.severity, second.severity_scale) == ("medium", "cvss")
    assert isinstance(third, Rejected) and "severity" in third.reason
    assert third.position == "ReportHost[1]/ReportItem[3]"


def test_item_without_plugin_id_is_rejected_and_others_kept():
    hosts = (
        _host("10.0.0.1", _item("1"), _item("2")),
        _host("10.0.0.2", _item("1"), _item("2"), _item("3"), _item("4"), _item(None), _item("6")),
    )
    records = parse_all("nessus", _doc(*hosts))
    assert [type(r).__name__ for r in records] == ["FindingRecord"] * 6 + ["Rejected", "FindingRecord"]
    rejected = records[6]
    assert rejected.position == "ReportHost[2]/ReportItem[5]"
    assert "pluginID" in rejected.reason
    assert records[-1].provider_id == "10.0.0.2|6|443/tcp"


def test_unknown_vulnerability_state_is_rejected():
    item = _item("7", body="<vulnerability_state>Maybe</vulnerability_state>")
    [record] = parse_all("nessus", _doc(_host("10.0.0.1", item)))
    assert isinstance(record, Rejected)
    assert "Maybe".lower() in record.reason and record.provider_id == "10.0.0.1|7|443/tcp"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thu Jun 22 11:33:59 2017", datetime(2017, 6, 22, 11, 33, 59, tzinfo=UTC)),
        ("Mon Jul  1 11:40:48 2013", datetime(2013, 7, 1, 11, 40, 48, tzinfo=UTC)),
        ("Feb 9, 2024 10:48:42 UTC", datetime(2024, 2, 9, 10, 48, 42, tzinfo=UTC)),
        ("Jan 5, 2021 10:24:08 MST", datetime(2021, 1, 5, 17, 24, 8, tzinfo=UTC)),
        ("2021-03-12T12:34:30.5+01:00", datetime(2021, 3, 12, 11, 34, 30, 500000, tzinfo=UTC)),
        ("1648044472", datetime(2022, 3, 23, 14, 7, 52, tzinfo=UTC)),
        ("Jan 5, 2021 10:24:08 XYZT", None),
        ("yesterday", None),
        ("-1", None),
    ],
)
def test_dates(text, expected):
    assert parse_any_time(text) == expected


# ---- refused input ------------------------------------------------------------------


def test_nessus_v1_is_a_format_error(sample):
    with pytest.raises(FormatError, match=r"Nessus v1.*<NessusClientData>"):
        _records(sample("nessus_v2_xml/ruby-nessus_example_v1_legacy_NessusClientData.nessus"))


def test_wrong_root_is_a_format_error(sample):
    with pytest.raises(FormatError, match=r"root element is <NessusClientData_vwrong>"):
        _records(sample("nessus_v2_xml/ruby-nessus_example_v_wrong.nessus"))


@pytest.mark.parametrize("body", [b'{"findings": []}', b"Plugin ID,Host\n1,a\n", b"", b"just text"])
def test_non_xml_is_a_format_error(body):
    with pytest.raises(FormatError, match="not an XML document"):
        parse_all("nessus", body)


def test_truncated_xml_is_a_format_error():
    data = _doc(_host("10.0.0.1", _item("1"), _item("2")))
    with pytest.raises(FormatError, match="not well-formed"):
        parse_all("nessus", data[:-40])


def test_billion_laughs_is_refused():
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    data = _doc(
        _host("10.0.0.1", _item("1", body="<plugin_output>&lol9;</plugin_output>")),
        prolog=f'<?xml version="1.0"?>\n<!DOCTYPE NessusClientData_v2 [{entities}]>',
    )
    with pytest.raises(FormatError, match="entity"):
        parse_all("nessus", data)


def test_xxe_is_refused():
    data = _doc(
        _host("10.0.0.1", _item("1", body="<plugin_output>&xxe;</plugin_output>")),
        prolog='<?xml version="1.0"?>\n<!DOCTYPE NessusClientData_v2 [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    )
    with pytest.raises(FormatError, match="entity") as caught:
        parse_all("nessus", data)
    assert "root:" not in str(caught.value)


def test_external_dtd_is_not_loaded():
    data = _doc(
        _host("10.0.0.1", _item("1", body="<plugin_output>&xxe;</plugin_output>")),
        prolog='<?xml version="1.0"?>\n<!DOCTYPE NessusClientData_v2 SYSTEM "file:///etc/passwd">',
    )
    [record] = parse_all("nessus", data)
    assert record.evidence is None


# ---- detection and streaming ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "issue_6992.nessus", "nessus_many_vuln.xml", "nessus_v_unknown.xml", "nessus_was_many_vuln.xml",
        "nessus_was_no_vuln.xml", "nessus_was_one_vuln.xml", "nessus_with_cvssv3.nessus",
        "nessus_with_cwe-.nessus", "pytenable_example.nessus",
    ],
)
def test_detect_v2_samples(sample, name):
    assert connectors.detect(sample(f"nessus_v2_xml/{name}").read_bytes()[:65536]) == "nessus"


def test_detect_ignores_v1_and_wrong_root(sample):
    names = ("ruby-nessus_example_v1_legacy_NessusClientData.nessus", "ruby-nessus_example_v_wrong.nessus")
    for name in names:
        assert connectors.detect(sample(f"nessus_v2_xml/{name}").read_bytes()[:65536]) != "nessus"


def _write_synthetic(path, target_bytes: int) -> int:
    """Write a Nessus v2 file of about target_bytes, 50 items per host; return the item count."""
    items = 0
    description = "A description of the synthetic vulnerability. " * 6
    output = "output line " * 20
    with open(path, "w", encoding="utf-8") as out:
        out.write('<?xml version="1.0" ?>\n<NessusClientData_v2><Policy><policyName>synthetic</policyName>'
                  '</Policy>\n<Report name="synthetic">\n')
        host = 0
        while out.tell() < target_bytes:
            host += 1
            out.write(
                f'<ReportHost name="10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}"><HostProperties>'
                '<tag name="HOST_END">Thu Jun 22 11:33:59 2017</tag>'
                f'<tag name="host-fqdn">host{host}.example.com</tag></HostProperties>\n'
            )
            for plugin in range(50):
                items += 1
                out.write(
                    f'<ReportItem port="{443 + plugin}" svc_name="www" protocol="tcp" '
                    f'severity="{plugin % 5}" pluginID="{10000 + plugin}" '
                    f'pluginName="Synthetic plugin {plugin}" pluginFamily="General">'
                    f"<description>{description}</description><solution>Upgrade.</solution>"
                    "<risk_factor>Medium</risk_factor><cvss3_base_score>6.5</cvss3_base_score>"
                    f"<cve>CVE-2024-{1000 + plugin}</cve><see_also>https://example.com/{plugin}</see_also>"
                    f"<plugin_output>{output}</plugin_output></ReportItem>\n"
                )
            out.write("</ReportHost>\n")
        out.write("</Report></NessusClientData_v2>\n")
    return items


def test_memory_stays_flat_on_a_large_file(tmp_path):
    path = tmp_path / "large.nessus"
    expected = _write_synthetic(path, 20_000_000)
    assert path.stat().st_size >= 20_000_000
    module = connectors.get("nessus")
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with open(path, "rb") as stream:
            count = 0
            last = None
            for record in module.parse(stream, ParseOptions(provider="Test")):
                count += 1
                last = record
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == expected
    assert last.title == "Synthetic plugin 49" and last.cves == ["CVE-2024-1049"]
    assert peak < 20 * 1024 * 1024, f"peak Python memory {peak / 1e6:.1f} MB"
    assert elapsed < 30


def test_parse_does_not_close_the_stream():
    stream = io.BytesIO(_doc(_host("10.0.0.1", _item("1"))))
    assert len(list(connectors.get("nessus").parse(stream, ParseOptions()))) == 1
    assert not stream.closed


def test_identity_facts_after_the_findings_reach_every_record_of_the_host(sample):
    records = _records(sample("nessus_v2_xml/identity_facts_late.nessus"))
    assert [(type(r).__name__, r.vendor_id) for r in records] == [
        ("FindingRecord", "153953"), ("Observation", "11219"), ("Observation", "12053"),
        ("Observation", "11936"), ("Observation", "86420"), ("Observation", "10150"),
        ("Observation", "22964"),
    ]
    first_host = records[:6]
    expected = {
        "fqdn": "db-1.corp.example.com",  # 12053 "10.20.30.40 resolves as db-1.corp.example.com."
        "os": "Linux Kernel 5.15 on Ubuntu 22.04",  # 11936 "Remote operating system : ..."
        "mac": "02:42:ac:11:00:02",  # 86420 lists two: the lowest, sorted
        "netbios": "DB-1",  # 10150 "DB-1 = Computer name"
        "ipv4": ["10.20.30.40"],
        "host_key": "10.20.30.40",  # the ReportHost name
        "kind": "host",
    }
    for record in first_host:
        assert {key: getattr(record.resource, key) for key in expected} == expected
    finding = records[0]
    # the provider id keeps its key from the ReportHost name and HostProperties only
    assert finding.provider_id == "10.20.30.40|153953|22/tcp"
    assert finding.scan == "Weekly internal scan"
    assert finding.cvss_vector == "CVSS:3.0/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N"
    assert finding.last_seen == datetime(2024, 3, 12, 10, 15, 2, tzinfo=UTC)


def test_informational_items_are_observations(sample):
    records = _records(sample("nessus_v2_xml/identity_facts_late.nessus"))
    observations = {r.vendor_id: r for r in records if isinstance(r, Observation)}
    summary = {
        vid: (o.category, o.value, o.port, o.protocol, o.service) for vid, o in observations.items()
    }
    assert summary == {
        "11219": ("port", "22/tcp", 22, "tcp", "ssh"),
        "12053": ("identity", "db-1.corp.example.com", None, None, None),
        "11936": ("os", "Linux Kernel 5.15 on Ubuntu 22.04", None, None, None),
        "86420": ("identity", "02:42:ac:11:00:02, 0a:1b:2c:3d:4e:5f", None, None, None),
        "10150": ("identity", "DB-1", 137, "udp", "netbios-ns"),
        "22964": ("service", "443/tcp www", 443, "tcp", "www"),
    }
    os_fact = observations["11936"]
    assert os_fact.name == "OS Identification"
    assert os_fact.evidence == (
        "Remote operating system : Linux Kernel 5.15 on Ubuntu 22.04\nConfidence level : 95\nMethod : SSH"
    )
    assert os_fact.provider_id == "10.20.30.40|11936|0/tcp"
    assert os_fact.scan == "Weekly internal scan"
    assert os_fact.last_seen == datetime(2024, 3, 12, 10, 15, 2, tzinfo=UTC)


def test_operating_system_tag_rendered_as_a_list_is_plain_text(sample):
    service = _records(sample("nessus_v2_xml/identity_facts_late.nessus"))[-1]
    assert service.resource.os == "Microsoft Windows Server 2019 Standard"
    assert service.resource.fqdn == "web-2.corp.example.com"
    assert service.resource.host_key == "web-2.corp.example.com"
    records = parse_all("nessus", _doc(_host("h1", _item(), tags={
        "operating-system": "['Linux Kernel 3.10', 'Linux Kernel 4.4']"})))
    assert records[0].resource.os == "Linux Kernel 3.10 / Linux Kernel 4.4"


def test_report_without_name_has_no_scan():
    doc = (b'<?xml version="1.0" ?><NessusClientData_v2><Report>'
           + _host("10.0.0.1", _item()).encode() + b"</Report></NessusClientData_v2>")
    (record,) = parse_all("nessus", doc)
    assert (record.scan, record.resource.host_key) == (None, "10.0.0.1")


# ---- one plugin on many hosts -----------------------------------------------------


def test_a_plugin_seen_on_many_hosts_gives_each_host_its_own_record():
    """The plugin's own fields are computed once per distinct plugin text (a large scan
    reports one plugin on thousands of hosts); each record still has its own lists, and a
    plugin whose text differs (another CVSS, one more CVE) gets its own fields."""
    body = (
        "<description>Old TLS.</description><solution>Upgrade.</solution>"
        "<cvss3_base_score>7.5</cvss3_base_score><cvss3_vector>AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N</cvss3_vector>"
        "<cve>CVE-2020-0001</cve><see_also>https://example.com/a\nhttps://example.com/b</see_also>"
        "<xref>CWE:327</xref><vpr_score>6.1</vpr_score>"
    )
    hosts = [
        _host(f"10.0.0.{n}", _item(body=body + f"<plugin_output>host {n}</plugin_output>"))
        for n in range(1, 4)
    ]
    changed = body.replace("7.5", "9.8").replace("<cve>CVE-2020-0001</cve>", "<cve>CVE-2020-0001</cve><cve>CVE-2021-0002</cve>")
    hosts.append(_host("10.0.0.9", _item(body=changed + "<plugin_output>host 9</plugin_output>")))
    records = parse_all("nessus", _doc(*hosts))
    assert [r.evidence for r in records] == ["host 1", "host 2", "host 3", "host 9"]
    first, second, third, other = records
    for record in (first, second, third):
        assert record.cves == ["CVE-2020-0001"]
        assert record.cvss_score == 7.5 and record.severity == "high"
        assert record.references == ["https://example.com/a", "https://example.com/b"]
        assert record.extra["cwe"] == ["327"] and record.extra["vpr_score"] == "6.1"
        assert record.description == "Old TLS." and record.remediation == "Upgrade."
    assert other.cves == ["CVE-2020-0001", "CVE-2021-0002"]
    assert other.cvss_score == 9.8 and other.severity == "high"
    # no list is shared between records: changing one leaves the others as parsed
    first.cves.append("CVE-1999-0001")
    first.references.clear()
    first.extra["cwe"].append("79")
    assert second.cves == ["CVE-2020-0001"] and third.cves == ["CVE-2020-0001"]
    assert second.references == ["https://example.com/a", "https://example.com/b"]
    assert second.extra["cwe"] == ["327"]
    assert len({r.provider_id for r in records}) == 4
