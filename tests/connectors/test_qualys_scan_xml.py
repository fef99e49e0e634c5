from collections import Counter
from datetime import UTC, datetime

import pytest

import connectors
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from connectors.qualys_scan_xml import _Spool
from tests.connectors.conftest import parse_all

DIR = "qualys_scan_report_xml/"


def _report(hosts: str, glossary: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n'
        '<!DOCTYPE ASSET_DATA_REPORT SYSTEM "https://qualysguard.qualys.com/asset_data_report.dtd">\n'
        "<ASSET_DATA_REPORT><HEADER><GENERATION_DATETIME>2024-05-01T10:00:00Z</GENERATION_DATETIME></HEADER>"
        f"<HOST_LIST>{hosts}</HOST_LIST>"
        f"<GLOSSARY><VULN_DETAILS_LIST>{glossary}</VULN_DETAILS_LIST></GLOSSARY></ASSET_DATA_REPORT>"
    ).encode()


def _vuln_info(qid: str | None, extra: str = "") -> str:
    qid_element = f'<QID id="qid_{qid}">{qid}</QID>' if qid else ""
    return (f"<VULN_INFO>{qid_element}<TYPE>Vuln</TYPE><PORT>443</PORT><PROTOCOL>tcp</PROTOCOL>"
            "<SSL>true</SSL>"
            f"<RESULT><![CDATA[banner]]></RESULT><FIRST_FOUND>2024-01-01T00:00:00Z</FIRST_FOUND>"
            f"<LAST_FOUND>2024-04-01T00:00:00Z</LAST_FOUND>{extra}</VULN_INFO>")


def _details(qid: str, severity: str = "4") -> str:
    return (f'<VULN_DETAILS id="qid_{qid}"><QID id="qid_{qid}">{qid}</QID>'
            f"<TITLE><![CDATA[Title {qid}]]></TITLE>"
            f"<SEVERITY>{severity}</SEVERITY><THREAT><![CDATA[Threat<P>text]]></THREAT>"
            f"<SOLUTION><![CDATA[Fix it]]></SOLUTION></VULN_DETAILS>")


# -- ASSET_DATA_REPORT -----------------------------------------------------------------


def test_empty_asset_data_report(sample):
    data = sample(DIR + "empty.xml").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_scan_xml"
    assert parse_all("qualys_scan_xml", data) == []


def test_asset_data_report_sample(sample):
    data = sample(DIR + "Qualys_Sample_Report.xml").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_scan_xml"
    records = parse_all("qualys_scan_xml", data)
    assert len(records) == 301
    assert len({r.provider_id for r in records}) == 301
    assert Counter(r.resource.ipv4[0] for r in records) == {
        "64.41.200.243": 21, "64.41.200.244": 24, "64.41.200.245": 20, "64.41.200.247": 42,
        "64.41.200.246": 47, "64.41.200.249": 27, "64.41.200.250": 120}
    # information gathered ("Ig") items are observations, never findings
    observations = [r for r in records if isinstance(r, Observation)]
    findings = [r for r in records if isinstance(r, FindingRecord)]
    assert len(observations) == 209 and len(findings) == 92
    assert Counter(r.extra["qualys_type"] for r in findings) == {"Vuln": 90, "Practice": 2}
    assert Counter(r.category for r in observations) == {
        "other": 129, "identity": 26, "service": 26, "port": 14, "network": 7, "os": 7}
    assert {r.scan for r in records} == {None}  # the ASSET_DATA_REPORT header names no report
    assert {r.resource.host_key for r in records} == {r.resource.ipv4[0] for r in records}
    by_id = {r.provider_id: r for r in records}

    ssh = by_id["64.41.200.243|38739|22/tcp"]
    assert ssh.title == "Deprecated SSH Cryptographic Settings"
    assert ssh.vendor_id == "38739"
    assert ssh.severity == "low" and ssh.severity_original == "2" and ssh.severity_scale == "qualys 1-5"
    assert ssh.status == "open" and ssh.extra["qualys_status"] == "New"
    assert ssh.first_seen == ssh.last_seen == datetime(2019, 7, 31, 21, 57, 48, tzinfo=UTC)
    assert ssh.provider_timestamp == datetime(2019, 7, 31, 21, 57, 48, tzinfo=UTC)
    assert ssh.evidence.startswith("Type\tName\nkey exchange\tdiffie-hellman-group1-sha1")
    assert ssh.resource.fqdn == "demo13.s02.sjc01.qualys.com"
    assert ssh.resource.os == "Ubuntu / Tiny Core Linux / Linux 2.6.x"
    assert ssh.extra["tracking_method"] == "DNS"

    bluekeep = by_id["64.41.200.247|91541|/"]
    assert bluekeep.title.startswith("Microsoft Windows Remote Desktop Services Remote Code Execution")
    assert bluekeep.severity == "critical"
    assert bluekeep.cves == ["CVE-2019-0708"]
    assert bluekeep.resource.netbios == "TRN-WIN7"
    assert bluekeep.resource.fqdn == "trn-win7.trn.qualys.com"
    assert bluekeep.resource.os == "Windows 2008 R2/7"
    assert len(bluekeep.references) == 3
    assert bluekeep.references[0] == "https://portal.msrc.microsoft.com/en-US/security-guidance/advisory/CVE-2019-0708"

    libxml = by_id["64.41.200.250|11803|/"]
    assert libxml.severity == "medium"
    assert len(libxml.cves) == 16 and libxml.cves[:2] == ["CVE-2015-8806", "CVE-2016-1762"]
    assert libxml.description.startswith("libxml2 is prone to multiple vulnerabilities:-\n")
    assert "libxml2 (http://xmlsoft.org/downloads.html)" in libxml.remediation

    amd = by_id["64.41.200.243|370876|/"]
    assert amd.extra["qualys_status"] == "Active" and amd.extra["qualys_type"] == "Practice"
    assert amd.severity == "high"
    assert amd.cvss_score == 9.0
    assert amd.cvss_vector == "AV:N/AC:H/PR:N/UI:N/S:C/C:H/I:H/A:H"
    assert amd.first_seen == datetime(2020, 10, 15, 12, 16, 23, tzinfo=UTC)
    assert amd.last_seen == datetime(2021, 4, 19, 2, 35, 28, tzinfo=UTC)

    dns = by_id["64.41.200.243|6|/"]
    assert isinstance(dns, Observation)
    assert (dns.name, dns.category, dns.value) == ("DNS Host Name", "identity", "demo13.s02.sjc01.qualys.com")
    assert dns.vendor_id == "6" and dns.evidence.startswith("IP address\tHost name\n64.41.200.243")
    seen = datetime(2019, 7, 31, 21, 57, 48, tzinfo=UTC)
    assert dns.first_seen == dns.last_seen == dns.provider_timestamp == seen
    os_fact = by_id["64.41.200.244|45017|/"]
    assert (os_fact.category, os_fact.value) == (
        "os", "Linux 2.4-2.6 / Embedded Device / F5 Networks Big-IP / Linux 2.6")
    # identity facts of information gathered items reach every record of the host, findings too
    mac = by_id["64.41.200.247|43007|/"]
    assert (mac.name, mac.category, mac.value) == (
        "Network Adapter MAC Address", "identity", "00:50:56:b2:71:56")
    netbios = by_id["64.41.200.247|82044|/"]
    assert (netbios.category, netbios.value) == ("identity", "TRN-WIN7")
    assert bluekeep.resource.mac == "00:50:56:b2:71:56"
    assert {r.resource.mac for r in records if r.resource.ipv4 == ["64.41.200.247"]} == {"00:50:56:b2:71:56"}
    assert {r.resource.mac for r in records if r.resource.ipv4 == ["64.41.200.243"]} == {None}
    assert by_id["64.41.200.243|82023|/"].category == "port"


def test_report_host_identifiers_status_and_timestamps():
    host = ("<HOST><IP>10.0.0.7</IP><TRACKING_METHOD>AGENT</TRACKING_METHOD><ASSET_ID>4711</ASSET_ID>"
            "<HOST_ID>99</HOST_ID><DNS><![CDATA[app7]]></DNS><NETBIOS>APP7</NETBIOS>"
            "<OPERATING_SYSTEM>Linux</OPERATING_SYSTEM><VULN_INFO_LIST>"
            + _vuln_info("100", "<VULN_STATUS>Fixed</VULN_STATUS>"
                         "<LAST_FIXED>2024-04-20T00:00:00Z</LAST_FIXED>")
            + _vuln_info("101", "<VULN_STATUS>Re-Opened</VULN_STATUS><FQDN>www.app7.example</FQDN>")
            + "</VULN_INFO_LIST></HOST>")
    fixed, reopened = parse_all("qualys_scan_xml", _report(host, _details("100") + _details("101", "5")))
    assert fixed.status == "fixed" and fixed.extra["qualys_status"] == "Fixed"
    assert fixed.provider_timestamp == datetime(2024, 4, 20, tzinfo=UTC)  # LAST_FIXED is the latest change
    assert fixed.title == "Title 100" and fixed.severity == "high"
    assert fixed.description == "Threat\ntext" and fixed.remediation == "Fix it"
    assert fixed.evidence == "banner" and fixed.extra["ssl"] is True
    assert fixed.provider_id == "10.0.0.7|100|443/tcp"
    assert fixed.resource.agent_id == "qualys-asset:4711"
    assert fixed.resource.hostname == "app7" and fixed.resource.netbios == "APP7"
    assert fixed.extra["host_id"] == "99"
    assert reopened.status == "open" and reopened.severity == "critical"
    assert reopened.provider_id == "10.0.0.7|101|443/tcp|www.app7.example"


def test_report_rejections_keep_the_other_records():
    host = ('<HOST><IP>10.0.0.8</IP><VULN_INFO_LIST>'
            + _vuln_info("200") + _vuln_info(None) + _vuln_info("201")
            + _vuln_info("202", "<VULN_STATUS>Gone</VULN_STATUS>")
            + _vuln_info("203")
            + "</VULN_INFO_LIST></HOST>")
    glossary = _details("200") + _details("202") + _details("203", "7")
    records = parse_all("qualys_scan_xml", _report(host, glossary))
    assert [type(r) for r in records] == [FindingRecord, Rejected, Rejected, Rejected, Rejected]
    assert [r.position for r in records[1:]] == [
        "HOST[1]/VULN_INFO[2]", "HOST[1]/VULN_INFO[3]", "HOST[1]/VULN_INFO[4]", "HOST[1]/VULN_INFO[5]"]
    assert "QID" in records[1].reason
    assert "GLOSSARY" in records[2].reason and records[2].provider_id == "10.0.0.8|201|443/tcp"
    assert "VULN_STATUS" in records[3].reason
    assert "SEVERITY" in records[4].reason


def test_spool_spills_to_disk_and_reads_back():
    spool = _Spool(memory_limit=1024)
    try:
        rows = [(n, f"HOST[{n}]/VULN_INFO[1]", str(n), None, "x" * 100) for n in range(200)]
        for row in rows:
            spool.append(row)
        assert spool._file._rolled  # over the limit: now a real temporary file
        assert [tuple(item) for item in spool] == rows
        assert [tuple(item) for item in spool] == rows  # iterable more than once
    finally:
        spool.close()


# -- legacy SCAN -------------------------------------------------------------------------


def test_legacy_scan_without_vulns(sample):
    data = sample(DIR + "qualys_infrascan_webgui_0.xml").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_scan_xml"
    assert parse_all("qualys_scan_xml", data) == []


def test_legacy_scan_one_vuln(sample):
    [record] = parse_all("qualys_scan_xml", sample(DIR + "qualys_infrascan_webgui_1.xml").read_bytes())
    assert record.provider_id == "10.1.10.1|123168|/"
    assert record.title == "Oracle Java SE Critical Patch Update - January 2015"
    assert record.vendor_id == "123168"
    assert record.severity == "critical" and record.severity_original == "5"
    assert record.status == "open"
    assert len(record.cves) == 19
    assert record.cves[:3] == ["CVE-2014-6601", "CVE-2015-0412", "CVE-2014-6549"]
    assert record.description == "some diagnosis" and record.remediation == "some solution"
    assert record.evidence == "some output"
    assert record.cvss_score == 3.4  # CVSS3_BASE before CVSS_BASE
    assert record.last_seen == record.provider_timestamp == datetime(2019, 4, 2, 10, 14, 53, tzinfo=UTC)
    assert record.first_seen is None
    assert record.references == ["https://support.oracle.com/rs?type=doc&id=1948935.1"]
    assert record.resource.ipv4 == ["10.1.10.1"]
    assert record.resource.fqdn == "host1.example.com"
    assert record.resource.os == "Ubuntu 11"
    assert record.extra == {"qualys_type": "VULN", "category": "Local"}


def test_legacy_scan_no_registered_hostname(sample):
    [record] = parse_all("qualys_scan_xml", sample(DIR + "qualys_infrascan_webgui_3.xml").read_bytes())
    assert record.title == "UDP Constant IP Identification Field Fingerprinting Vulnerability"
    assert record.severity == "low"
    assert record.cves == ["CVE-2002-0510"]
    assert record.cvss_score == 5.0  # CVSS3_BASE empty: CVSS_BASE
    assert record.resource.fqdn is None and record.resource.hostname is None
    assert record.resource.name == "10.1.10.1"


def test_legacy_scan_all_categories(sample):
    records = parse_all("qualys_scan_xml", sample(DIR + "qualys_infrascan_webgui_multiple.xml").read_bytes())
    assert len(records) == 24
    findings = [r for r in records if isinstance(r, FindingRecord)]
    observations = [r for r in records if isinstance(r, Observation)]
    assert Counter(r.extra["qualys_type"] for r in findings) == {"VULN": 6, "PRACTICE": 2}
    assert len(observations) == 16  # 12 INFO + 4 SERVICE: information gathered
    assert Counter(r.resource.ipv4[0] for r in records) == {"10.1.10.1": 12, "10.2.10.2": 12}
    assert len({r.provider_id for r in records}) == 24
    assert {r.scan for r in records} == {"scan/1222134912.63524"}  # the SCAN's ref
    assert {r.resource.host_key for r in records} == {"10.1.10.1", "10.2.10.2"}
    by_id = {r.provider_id: r for r in records}
    iptables = by_id["10.1.10.1|45376|/"]
    assert (iptables.name, iptables.category, iptables.value) == (
        "Display IP Tables info on Linux OS", "other", "some output")
    assert iptables.last_seen == datetime(2019, 4, 2, 10, 14, 53, tzinfo=UTC)
    assert (by_id["10.1.10.1|82023|/"].category, by_id["10.1.10.1|42017|/"].category) == ("port", "service")
    practice = by_id["10.2.10.2|124848|/"]
    assert practice.severity == "critical" and practice.cves == ["CVE-2016-0636"]
    assert practice.cvss_score == 8.1
    assert practice.resource.fqdn == "host2.example.com"
    rpc = by_id["10.1.10.1|11|/"]
    assert rpc.title == "Hidden RPC Services" and rpc.severity == "low" and rpc.cvss_score == 5.0
    assert rpc.extra["category"] == "RPC"


def test_legacy_scan_ports_and_rejections():
    body = (b'<?xml version="1.0"?><SCAN value="scan/1">'
            b'<HEADER><KEY value="DATE">2024-05-01T10:00:00Z</KEY></HEADER>'
            b'<IP value="10.3.3.3" name="db3"><OS>Linux</OS><NETBIOS_HOSTNAME>DB3</NETBIOS_HOSTNAME><VULNS>'
            b'<CAT value="Database" port="5432" protocol="tcp">'
            b'<VULN number="19001" severity="4"><TITLE>PostgreSQL weak auth</TITLE></VULN>'
            b'<VULN severity="4"><TITLE>no number</TITLE></VULN>'
            b'<VULN number="19002" severity="0"><TITLE>bad severity</TITLE></VULN>'
            b"</CAT></VULNS></IP></SCAN>")
    records = parse_all("qualys_scan_xml", body)
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected"]
    record = records[0]
    assert record.provider_id == "10.3.3.3|19001|5432/tcp"
    assert record.severity == "high"
    assert record.resource.hostname == "db3" and record.resource.netbios == "DB3"
    assert records[1].position == "IP[1]/VULN[2]" and "number" in records[1].reason
    assert records[2].position == "IP[1]/VULN[3]" and "severity" in records[2].reason


# -- refusing other and hostile input ----------------------------------------------------


def test_other_roots_and_non_xml_are_format_errors(sample):
    with pytest.raises(FormatError, match="NessusClientData_v2"):
        parse_all("qualys_scan_xml", sample("nessus_v2_xml/nessus_many_vuln.xml").read_bytes())
    with pytest.raises(FormatError, match="HOST_LIST_VM_DETECTION_OUTPUT"):
        parse_all("qualys_scan_xml", sample("qualys_hld_xml/jupiterone_detections.xml").read_bytes())
    with pytest.raises(FormatError):
        parse_all("qualys_scan_xml", b"this is not xml")


def test_entities_and_truncation_are_refused():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE SCAN [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            b'<SCAN value="x"><IP value="10.0.0.1"><VULNS><CAT value="x"><VULN number="1" severity="2">'
            b"<TITLE>&b;</TITLE></VULN></CAT></VULNS></IP></SCAN>")
    with pytest.raises(FormatError, match="entity"):
        parse_all("qualys_scan_xml", bomb)
    xxe = (b'<?xml version="1.0"?><!DOCTYPE ASSET_DATA_REPORT [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           b"<ASSET_DATA_REPORT><HOST_LIST/><GLOSSARY><VULN_DETAILS_LIST><VULN_DETAILS><QID>1</QID>"
           b"<TITLE>&x;</TITLE></VULN_DETAILS></VULN_DETAILS_LIST></GLOSSARY></ASSET_DATA_REPORT>")
    with pytest.raises(FormatError, match="entity"):
        parse_all("qualys_scan_xml", xxe)
    host = '<HOST><IP>10.0.0.8</IP><VULN_INFO_LIST>' + _vuln_info("200") + "</VULN_INFO_LIST></HOST>"
    with pytest.raises(FormatError, match="well-formed"):
        parse_all("qualys_scan_xml", _report(host, _details("200"))[:-50])


def test_legacy_scan_identity_facts_reach_every_record_of_the_host():
    body = (b'<?xml version="1.0"?><SCAN value="scan/1714557600.1">'
            b'<HEADER><KEY value="DATE">2024-05-01T10:00:00Z</KEY><KEY value="TITLE">Weekly</KEY></HEADER>'
            b'<IP value="10.4.4.4"><VULNS><CAT value="Database" port="5432" protocol="tcp">'
            b'<VULN number="19001" severity="4"><TITLE>PostgreSQL weak auth</TITLE></VULN></CAT></VULNS>'
            b'<INFOS><CAT value="Information gathering">'
            b'<INFO number="6" severity="1"><TITLE>DNS Host Name</TITLE>'
            b'<RESULT format="table">IP address\tHost name\n10.4.4.4\tdb4.corp.example</RESULT></INFO>'
            b'<INFO number="43007" severity="1"><TITLE>Network Adapter MAC Address</TITLE>'
            b'<RESULT format="table">#table cols=3\nMethod\tMAC Address\tVendor\n'
            b'NBTSTAT\t00:50:56:B2:71:57\tVMWARE\nARP\t00:50:56:A0:00:01\tVMWARE</RESULT></INFO>'
            b'<INFO number="82044" severity="1"><TITLE>NetBIOS Host Name</TITLE><RESULT>DB4</RESULT></INFO>'
            b'<INFO number="45017" severity="2"><TITLE>Operating System Detected</TITLE>'
            b'<RESULT format="table">Operating System\tTechnique\tID\n'
            b'Linux 5.x\tTCP/IP Fingerprint\tU1</RESULT>'
            b'</INFO></CAT></INFOS>'
            b'<SERVICES><CAT value="TCP/IP" port="5432" protocol="tcp"><SERVICE number="82023" severity="1">'
            b'<TITLE>Open TCP Services List</TITLE><RESULT>5432 postgres</RESULT></SERVICE></CAT></SERVICES>'
            b'</IP><IP value="10.5.5.5"><VULNS><CAT value="x"><VULN number="1" severity="2"><TITLE>t</TITLE>'
            b'</VULN></CAT></VULNS></IP></SCAN>')
    records = parse_all("qualys_scan_xml", body)
    assert [type(r).__name__ for r in records] == ["FindingRecord"] + ["Observation"] * 5 + ["FindingRecord"]
    vuln, dns, mac, netbios, os_fact, port, other = records
    for record in records[:6]:  # the fact items come after the finding: the host was gathered first
        assert record.resource.fqdn == "db4.corp.example"
        assert record.resource.mac == "00:50:56:a0:00:01"  # the lowest of the two, sorted
        assert record.resource.netbios == "DB4" and record.resource.os == "Linux 5.x"
        assert record.resource.host_key == "10.4.4.4" and record.resource.name == "db4.corp.example"
        assert record.scan == "scan/1714557600.1"
    assert (dns.category, dns.value) == ("identity", "db4.corp.example")
    assert (mac.category, mac.value) == ("identity", "00:50:56:a0:00:01, 00:50:56:b2:71:57")
    assert (netbios.value, os_fact.category, os_fact.value) == ("DB4", "os", "Linux 5.x")
    assert (port.category, port.value, port.port, port.protocol) == ("port", "5432/tcp", 5432, "tcp")
    assert port.provider_id == "10.4.4.4|82023|5432/tcp"
    assert other.resource.mac is None and other.resource.fqdn is None


def test_report_host_id_is_the_host_key_and_header_title_the_scan():
    host = ("<HOST><IP>10.0.0.9</IP><HOST_ID>12345</HOST_ID><VULN_INFO_LIST>" + _vuln_info("100")
            + '<VULN_INFO><QID id="qid_82044">82044</QID><TYPE>Ig</TYPE><RESULT>APP9</RESULT></VULN_INFO>'
            + "</VULN_INFO_LIST></HOST>")
    body = _report(host, _details("100")).replace(
        b"<HEADER>", b"<HEADER><TITLE>Monthly report</TITLE>")
    finding, observation = parse_all("qualys_scan_xml", body)
    assert finding.resource.host_key == "12345" and finding.resource.netbios == "APP9"
    assert finding.scan == observation.scan == "Monthly report"
    # an information gathered item needs no glossary entry: "QID <n>" names it
    assert (observation.name, observation.category, observation.value) == ("QID 82044", "identity", "APP9")
    assert observation.provider_timestamp == datetime(2024, 5, 1, 10, tzinfo=UTC)  # the report's time
