from datetime import UTC, datetime

import pytest

import connectors
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from tests.connectors.conftest import parse_all

SCAN = "qualys_scan_report_csv/"
VMDR = "qualys_vmdr_csv/"

HEADER = ('"IP","DNS","NetBIOS","OS","IP Status","QID","Title","Type","Severity","Port","Protocol","FQDN",'
          '"SSL","CVE ID","Vendor Reference","Bugtraq ID","CVSS Base","CVSS Temporal","CVSS3 Base",'
          '"CVSS3 Temporal","Threat","Impact","Solution","Exploitability","Associated Malware","Results",'
          '"PCI Vuln","Instance","Category","Vuln Status","First Detected","Last Detected"\n')
PREAMBLE = (
    '"Scan Results","scan/1714557600.12345"\n'
    '"Acme Corp","1 Main Street","Springfield","None","12345","USA"\n'
    '"Jane Doe","acme_jd","Manager"\n'
    '"Launch Date","Active Hosts","Total Hosts","Type","Status","Reference","Scan Title"\n'
    '"05/01/2024 at 10:00:00 (GMT+0200)","2","2","On demand","Finished","scan/1714557600.12345",'
    '"Quarterly\nexternal scan"\n'
    "\n"
)


def _row(ip="10.0.0.5", qid="38739", title="Deprecated SSH Cryptographic Settings", severity="2",
         threat="Weak <B>ciphers</B>", results="cipher\tarcfour", status="Active", cve="", first="", last=""):
    cells = [ip, "ssh1.corp.example", "SSH1", "Linux 5.4", "host scanned, found vuln", qid, title, "Vuln",
             severity, "22", "tcp", "", "no", cve, "", "", "4.3", "3.6",
             "5.3 (AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N)", "4.8", threat, "Impact text",
             'Disable <A HREF="https://x.example">weak</A> ciphers.', "", "",
             results, "yes", "", "General remote services", status, first, last]
    return ",".join('"' + cell.replace('"', '""') + '"' for cell in cells) + "\n"


# -- scan report CSV -------------------------------------------------------------------


def test_empty_scan_report(sample):
    data = sample(SCAN + "empty.csv").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    assert parse_all("qualys_csv", data) == []


def test_scan_report_sample(sample):
    data = sample(SCAN + "Qualys_Sample_Report.csv").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    records = parse_all("qualys_csv", data)
    assert len(records) == 6
    assert all(isinstance(r, FindingRecord) for r in records)
    assert [r.provider_id for r in records] == [
        "10.98.57.180|105971|/", "10.98.57.180|105970|/", "10.98.57.180|91762|/",
        "10.98.57.151|105971|/", "10.98.49.209|105971|/", "10.98.35.11|105971|/"]
    first = records[0]
    assert first.title == "EOL/Obsolete Software: Microsoft ASP.NET 1.0 Detected"
    assert first.vendor_id == "105971"
    assert first.severity == "critical" and first.severity_original == "5"
    assert first.status == "open" and first.extra["qualys_status"] == "Active"
    assert first.first_seen == datetime(2021, 5, 13, 7, 8, 28, tzinfo=UTC)
    assert first.last_seen == datetime(2021, 5, 25, 7, 36, 58, tzinfo=UTC)
    assert first.cvss_score == 8.1 and first.cvss_vector == "AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:H/A:H"
    # multi-line quoted cells stay whole
    assert first.description.startswith("Microsoft ASP.NET 1.0 has reached product End of Life")
    assert "QID Detection Logic (Authenticated):\nThe qid looks" in first.description
    assert first.remediation.startswith("Upgrade to the latest supported Microsoft ASP.NET.")
    resource = first.resource
    assert resource.ipv4 == ["10.98.57.180"]
    assert resource.fqdn == "ip-10-98-57-180.eu-west-1.compute.internal"
    assert resource.netbios == "EC2AMAZ-IU0C43L"
    assert resource.os == "Windows Server 2016 Datacenter 64 bit Edition Version 1607"
    assert first.extra["tracking_method"] == "QAGENT"
    windows = records[2]
    assert windows.title == "Microsoft Windows Security Update for May 2021"
    assert len(windows.cves) == 23 and windows.cves[:2] == ["CVE-2021-31192", "CVE-2021-31188"]
    assert windows.cvss_score == 9.9
    fixed_before = records[3]
    # provider timestamp: the latest of Last Detected and Date Last Fixed (06/07/2021 22:53:26)
    assert fixed_before.last_seen == datetime(2021, 6, 8, 11, 8, 19, tzinfo=UTC)
    assert fixed_before.provider_timestamp == datetime(2021, 6, 8, 11, 8, 19, tzinfo=UTC)
    assert records[4].provider_timestamp == datetime(2021, 6, 8, 12, 18, tzinfo=UTC)


def test_pci_layout(sample):
    data = sample(SCAN + "monthly_pci_issue6932.csv").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    [record] = parse_all("qualys_csv", data)
    assert record.provider_id == "192.168.0.1|86476|80/tcp"
    assert record.title == "Web Server Stopped Responding"
    assert record.severity == "medium" and record.severity_original == "3"  # Q_SEVERITY, not the word
    assert record.resource.fqdn == "abv.xyw.com.fj"
    assert record.resource.os == "Linux 2.x"
    assert record.last_seen == datetime(2022, 9, 22, 13, 1, tzinfo=UTC)  # day-first date
    assert record.cvss_score == 6.4
    assert record.cves == []
    assert record.evidence.startswith("The web server did not respond for 4 consecutive HTTP requests.")
    assert record.extra["qualys_type"] == "POTENTIAL"


def test_preamble_multiline_cells_and_zone():
    data = (PREAMBLE + HEADER + _row(first="05/01/2024 09:00:00", last="05/01/2024 10:30:00",
                                     threat="line one\nline <P>two", cve="CVE-2024-0001, CVE-2024-0002")
            + '"CONFIDENTIAL AND PROPRIETARY INFORMATION. Qualys provides the Service"\n').encode()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    [record] = parse_all("qualys_csv", data)
    assert record.provider_id == "10.0.0.5|38739|22/tcp"
    assert record.description == "line one\nline\ntwo"
    assert record.remediation == "Disable weak (https://x.example) ciphers."
    assert record.evidence == "cipher\tarcfour"
    assert record.cves == ["CVE-2024-0001", "CVE-2024-0002"]
    assert record.cvss_score == 5.3
    # the preamble's "(GMT+0200)" is the zone of the report's dates
    assert record.first_seen == datetime(2024, 5, 1, 7, 0, tzinfo=UTC)
    assert record.last_seen == datetime(2024, 5, 1, 8, 30, tzinfo=UTC)
    assert record.resource.fqdn == "ssh1.corp.example" and record.resource.netbios == "SSH1"


def test_rows_without_host_or_qid_are_rejected_with_line():
    data = (PREAMBLE + HEADER + _row(qid="1") + _row(ip="", qid="2").replace("ssh1.corp.example", "")
            .replace('"SSH1"', '""') + _row(qid="") + _row(qid="4", severity="urgent")
            + _row(qid="5", status="Ignored") + _row(qid="6", first="someday") + "\n"
            + _row(qid="7")).encode()
    records = parse_all("qualys_csv", data)
    assert [type(r).__name__ for r in records] == ["FindingRecord"] + ["Rejected"] * 5 + ["FindingRecord"]
    header_line = PREAMBLE.count("\n") + 1
    assert [r.position for r in records if isinstance(r, Rejected)] == [
        f"line {header_line + n}" for n in (2, 3, 4, 5, 6)]
    assert "host" in records[1].reason
    assert "QID" in records[2].reason
    assert "Severity" in records[3].reason and records[3].provider_id == "10.0.0.5|4|22/tcp"
    assert "status" in records[4].reason
    assert "First Detected" in records[5].reason
    assert records[-1].vendor_id == "7"


@pytest.mark.parametrize("body", [
    b"",
    b"just,some,csv\n1,2,3\n",
    b'<?xml version="1.0"?><SCAN value="x"/>',
    b"Plugin ID,CVE,CVSS,Risk,Host,Protocol,Port,Name\n1,,,,10.0.0.1,tcp,80,x\n",
])
def test_other_bodies_are_format_errors(body):
    assert not connectors.get("qualys_csv").sniff(body)
    with pytest.raises(FormatError, match="QID"):
        parse_all("qualys_csv", body)


def test_stream_is_not_closed():
    import io

    from connectors.base import ParseOptions

    stream = io.BytesIO((HEADER + _row()).encode())
    assert len(list(connectors.get("qualys_csv").parse(stream, ParseOptions()))) == 1
    assert not stream.closed


# -- VMDR exports ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no_vuln_cve.csv", "no_vuln_no_metadata_cve.csv", "no_vuln_qid.csv"])
def test_vmdr_empty(sample, name):
    data = sample(VMDR + name).read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    assert parse_all("qualys_csv", data) == []


def test_vmdr_one_vuln_qid(sample):
    [record] = parse_all("qualys_csv", sample(VMDR + "one_vuln_qid.csv").read_bytes())
    assert record.provider_id == "119586089|100269|/"  # port 0 without protocol: no port
    assert record.title == "Microsoft Internet Explorer Security Update"
    assert record.severity == "critical"
    assert record.status == "open" and record.extra["qualys_status"] == "ACTIVE"
    assert record.resource.agent_id == "qualys-asset:119586089"
    assert record.resource.hostname == "TESTSERVER01" and record.resource.name == "TESTSERVER01"
    assert record.resource.ipv4 == ["10.0.0.1"]
    assert record.resource.os == "Windows Server 2019"
    # "GMT-0500" in the preamble: 03 Feb 2026 07:00 AM local is 12:00 UTC
    assert record.last_seen == datetime(2026, 2, 3, 12, 0, tzinfo=UTC)
    assert record.first_seen == datetime(2021, 4, 13, 20, 14, tzinfo=UTC)
    assert record.description == "Remote code execution vulnerability."
    assert record.remediation == "Apply the security update from Microsoft."
    assert record.evidence == "Version detected: 11.0.100"


def test_vmdr_one_vuln_cve_with_and_without_preamble(sample):
    [with_preamble] = parse_all("qualys_csv", sample(VMDR + "one_vuln_cve.csv").read_bytes())
    [bare] = parse_all("qualys_csv", sample(VMDR + "one_vuln_no_metadata_cve.csv").read_bytes())
    for record in (with_preamble, bare):
        assert record.provider_id == "200000001|730143|8080/tcp"
        assert record.cves == ["CVE-2021-44228"]
        assert record.title == "Apache Log4j Remote Code Execution (Log4Shell)"
        assert record.severity == "critical"
        assert record.cvss_score == 10.0  # CVSSv3.1 Base (nvd)
        assert record.resource.ipv4 == ["10.1.0.50"] and record.resource.hostname == "JAVAAPP01"
    assert with_preamble.last_seen == datetime(2026, 2, 3, 12, 0, tzinfo=UTC)
    assert bare.last_seen == datetime(2026, 2, 3, 7, 0, tzinfo=UTC)  # no preamble: UTC


def test_vmdr_many_vulns_qid(sample):
    records = parse_all("qualys_csv", sample(VMDR + "many_vulns_qid.csv").read_bytes())
    assert [r.vendor_id for r in records] == ["100001", "100002", "100003", "100004", "100005"]
    assert [r.severity for r in records] == ["informational", "low", "medium", "high", "critical"]
    assert [r.status for r in records] == ["open", "open", "fixed", "open", "open"]
    fixed = records[2]
    assert fixed.extra["qualys_status"] == "FIXED"
    assert fixed.resource.ipv4 == ["10.0.0.20", "10.0.0.21"]
    assert fixed.provider_id == "100000003|100003|22/tcp"
    assert fixed.resource.agent_id == "qualys-asset:100000003"
    assert fixed.evidence == "OpenSSH 7.9 detected"
    ipv6_only = records[4]
    assert ipv6_only.resource.ipv4 == [] and ipv6_only.resource.ipv6 == ["2001:db8::1"]
    assert ipv6_only.title == "Critical RCE Vulnerability"
    assert ipv6_only.first_seen == datetime(2025, 10, 1, 15, 0, tzinfo=UTC)


def test_vmdr_many_vulns_cve(sample):
    data = sample(VMDR + "many_vulns_cve.csv").read_bytes()
    assert connectors.detect(data[:65536]) == "qualys_csv"
    records = parse_all("qualys_csv", data)
    assert [r.cves for r in records] == [[f"CVE-2023-000{n}"] for n in range(1, 6)]
    assert [r.title for r in records] == [
        "Component X Information Disclosure", "DoS Vulnerability in Service Y",
        "SQL Injection in Application Z", "Local Privilege Escalation", "Critical RCE in Framework W"]
    assert [r.cvss_score for r in records] == [3.1, 5.3, 6.5, 7.8, 9.8]
    sqli = records[2]
    assert sqli.status == "fixed"
    assert sqli.resource.hostname == "DBSERVER01"
    assert sqli.provider_id == "300000003|800003|3306/tcp"
    # Last Detected (Feb 03) is later than Last Fixed (Jan 25)
    assert sqli.provider_timestamp == datetime(2026, 2, 3, 12, 0, tzinfo=UTC)
    assert records[3].resource.ipv4 == ["192.168.1.100", "192.168.1.101"]
    assert records[3].provider_id == "300000004|800004|/"


# -- information gathered, identity, network, scan --------------------------------------

IG_HEADER = ('"IP","Network","DNS","NetBIOS","Host ID","OS","QID","Title","Type","Severity","Port",'
             '"Protocol","Vuln Status","Results","First Detected","Last Detected"\n')


def _ig_row(qid, title, kind="Ig", severity="1", port="", protocol="", results="", ip="10.9.0.4",
            network="Branch-EU", dns="", host_id="88123"):
    cells = [ip, network, dns, "", host_id, "Linux 5.4", qid, title, kind, severity, port, protocol,
             "Active" if kind == "Vuln" else "", results, "05/01/2024 09:00:00", "05/02/2024 09:00:00"]
    return ",".join('"' + cell.replace('"', '""') + '"' for cell in cells) + "\n"


def test_information_gathered_rows_are_observations_with_host_facts():
    data = (PREAMBLE + IG_HEADER
            + _ig_row("38739", "Deprecated SSH Cryptographic Settings", kind="Vuln", severity="3",
                      port="22", protocol="tcp")
            + _ig_row("6", "DNS Host Name", results="IP address\tHost name\n10.9.0.4\tapp4.corp.example")
            + _ig_row("43007", "Network Adapter MAC Address",
                      results="Method\tMAC Address\tVendor\nNBTSTAT\t00:50:56:B2:71:58\tVMWARE")
            + _ig_row("82044", "NetBIOS Host Name", results="APP4")
            + _ig_row("82023", "Open TCP Services List", port="443", protocol="tcp", results="443 https")
            + _ig_row("38739", "Deprecated SSH Cryptographic Settings", kind="Vuln", severity="3",
                      port="22", protocol="tcp", ip="10.9.0.5", network="Global Default Network",
                      host_id="")).encode()
    records = parse_all("qualys_csv", data)
    assert [type(r).__name__ for r in records] == (
        ["FindingRecord"] + ["Observation"] * 4 + ["FindingRecord"])
    finding, dns, mac, netbios, port, other = records
    for record in records[:5]:  # the fact rows come after the finding: the host was gathered first
        resource = record.resource
        assert (resource.fqdn, resource.netbios, resource.mac) == (
            "app4.corp.example", "APP4", "00:50:56:b2:71:58")
        assert (resource.host_key, resource.network, resource.os) == ("88123", "Branch-EU", "Linux 5.4")
        assert record.scan == "scan/1714557600.12345"  # the preamble's scan reference
    assert finding.provider_id == "10.9.0.4|38739|22/tcp" and finding.severity == "medium"
    assert (dns.name, dns.category, dns.value, dns.vendor_id) == (
        "DNS Host Name", "identity", "app4.corp.example", "6")
    assert dns.provider_id == "10.9.0.4|6|/"
    assert dns.first_seen == datetime(2024, 5, 1, 7, 0, tzinfo=UTC)  # GMT+0200 of the preamble
    assert dns.last_seen == dns.provider_timestamp == datetime(2024, 5, 2, 7, 0, tzinfo=UTC)
    assert (mac.category, mac.value) == ("identity", "00:50:56:b2:71:58")
    assert (netbios.category, netbios.value) == ("identity", "APP4")
    assert (port.category, port.value, port.port, port.protocol, port.evidence) == (
        "port", "443/tcp", 443, "tcp", "443 https")
    # another host: none of the facts, the default network is no scope, the IP is the host key
    assert (other.resource.mac, other.resource.fqdn, other.resource.network) == (None, None, None)
    assert other.resource.host_key == "10.9.0.5"


def test_scan_title_when_no_scan_reference():
    preamble = PREAMBLE.replace('"Scan Results","scan/1714557600.12345"', '"Scan Results"').replace(
        '"Finished","scan/1714557600.12345"', '"Finished",""')
    [record] = parse_all("qualys_csv", (preamble + HEADER + _row()).encode())
    assert record.scan == "Quarterly external scan"


def test_vmdr_info_rows_are_observations(sample):
    header = ('"QID","Title","Severity","Type Detected","Last Detected","First Detected","Protocol","Port",'
              '"Status","Asset Id","Asset Name","Asset IPV4","Results"\n')
    rows = ('"45017","Operating System Detected","2","Info","Feb 03, 2026 07:00 AM","Jan 01, 2026 10:00 AM",'
            '"","","ACTIVE","100000001","WEBSERVER01","10.0.0.10","Operating System\tTechnique\tID\n'
            'Ubuntu 22.04\tAgent\t-"\n'
            '"100001","Information Disclosure","1","Confirmed","Feb 03, 2026 07:00 AM",'
            '"Jan 01, 2026 10:00 AM","TCP","80","ACTIVE","100000001","WEBSERVER01","10.0.0.10","x"\n')
    observation, finding = parse_all("qualys_csv", (header + rows).encode())
    assert isinstance(observation, Observation) and isinstance(finding, FindingRecord)
    assert (observation.category, observation.value) == ("os", "Ubuntu 22.04")
    assert finding.resource.os == observation.resource.os == "Ubuntu 22.04"
    assert finding.resource.host_key == "100000001"  # the asset id
