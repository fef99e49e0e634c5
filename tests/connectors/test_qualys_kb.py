from datetime import UTC, datetime

import pytest

import connectors
from connectors.model import FormatError, Rejected, VulnerabilityInfo
from tests.connectors.conftest import parse_all

KB_SAMPLE = "qualys_hld_xml/jupiterone_knowledge_base_vuln_list_response.xml"


def _kb(*vulns: str) -> bytes:
    vuln_list = f"<VULN_LIST>{''.join(vulns)}</VULN_LIST>" if vulns else ""
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<!DOCTYPE KNOWLEDGE_BASE_VULN_LIST_OUTPUT SYSTEM '
        '"https://qualysapi.qualys.com/api/2.0/fo/knowledge_base/vuln/knowledge_base_vuln_list_output.dtd">\n'
        "<KNOWLEDGE_BASE_VULN_LIST_OUTPUT><RESPONSE><DATETIME>2024-05-01T10:00:00Z</DATETIME>"
        f"{vuln_list}</RESPONSE></KNOWLEDGE_BASE_VULN_LIST_OUTPUT>"
    ).encode()


FULL_VULN = """<VULN>
  <QID>91541</QID><VULN_TYPE>Vulnerability</VULN_TYPE><SEVERITY_LEVEL>5</SEVERITY_LEVEL>
  <TITLE><![CDATA[Microsoft Remote Desktop Services RCE (BlueKeep)]]></TITLE>
  <CATEGORY>Windows</CATEGORY>
  <LAST_SERVICE_MODIFICATION_DATETIME>2024-02-01T12:00:00Z</LAST_SERVICE_MODIFICATION_DATETIME>
  <CVE_LIST><CVE><ID><![CDATA[CVE-2019-0708]]></ID><URL><![CDATA[http://cve.mitre.org/x]]></URL></CVE></CVE_LIST>
  <DIAGNOSIS><![CDATA[A <B>remote code execution</B> vulnerability exists.<P>Affected:<BR>Windows 7]]>
  </DIAGNOSIS>
  <SOLUTION><![CDATA[Apply <A HREF="https://msrc.example/kb1">the patch</A> &amp; reboot.]]></SOLUTION>
  <CVSS><BASE source="service">10.0</BASE><TEMPORAL>8.7</TEMPORAL>
    <VECTOR_STRING>CVSS:2.0/AV:N/AC:L/Au:N/C:C/I:C/A:C</VECTOR_STRING></CVSS>
  <CVSS_V3><BASE>9.8</BASE><TEMPORAL>9.1</TEMPORAL>
    <VECTOR_STRING>CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H</VECTOR_STRING></CVSS_V3>
</VULN>"""


def test_empty_knowledge_base_yields_nothing():
    assert parse_all("qualys_kb", _kb()) == []


def test_one_entry_all_fields():
    [entry] = parse_all("qualys_kb", _kb(FULL_VULN))
    assert entry == VulnerabilityInfo(
        vendor_id="91541",
        title="Microsoft Remote Desktop Services RCE (BlueKeep)",
        severity="critical",
        severity_original="5",
        cves=["CVE-2019-0708"],
        description="A remote code execution vulnerability exists.\nAffected:\nWindows 7",
        remediation="Apply the patch (https://msrc.example/kb1) & reboot.",
        cvss_score=9.8,
        cvss_vector="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
        provider_timestamp=datetime(2024, 2, 1, 12, 0, tzinfo=UTC),
    )


def test_cvss_v2_when_no_v3():
    vuln = FULL_VULN.replace("<CVSS_V3><BASE>9.8</BASE>", "<CVSS_V3><BASE>-</BASE>")
    [entry] = parse_all("qualys_kb", _kb(vuln))
    assert entry.cvss_score == 10.0
    assert entry.cvss_vector == "CVSS:2.0/AV:N/AC:L/Au:N/C:C/I:C/A:C"


def test_sample_entries(sample):
    records = parse_all("qualys_kb", sample(KB_SAMPLE).read_bytes())
    assert len(records) == 42
    assert all(isinstance(r, VulnerabilityInfo) for r in records)
    by_qid = {r.vendor_id: r for r in records}
    assert len(by_qid) == 42

    php = by_qid["150272"]
    assert php.title == "PHP 7 Multiple Vulnerabilities"
    assert php.severity == "medium" and php.severity_original == "3"
    assert php.cves == ["CVE-2019-11041", "CVE-2019-11042"]
    assert php.provider_timestamp == datetime(2019, 12, 27, 11, 59, 9, tzinfo=UTC)
    assert php.description.startswith("PHP is a programming language originally designed")
    assert "<P>" not in php.description and "\nPHP 7 is exposed" in php.description
    assert "PHP download (http://php.net/downloads.php)" in php.remediation
    assert php.cvss_score is None  # the sample carries no CVSS blocks

    apache = by_qid["150456"]
    assert apache.severity == "high"
    assert apache.cves == ["CVE-2021-44224"]
    assert apache.title.endswith("(CVE-2021-44224)")

    xss = by_qid["150001"]
    assert xss.title == "Reflected Cross-Site Scripting (XSS) Vulnerabilities"
    assert xss.severity == "critical" and xss.cves == []

    dns = by_qid["6"]
    assert dns.title == "DNS Host Name"
    assert dns.severity == "informational"
    assert dns.remediation is None  # no SOLUTION element

    # "Information Gathered" is informational whatever its level
    os_detected = by_qid["45017"]
    assert os_detected.severity == "informational" and os_detected.severity_original == "2"
    assert "&quot;" not in os_detected.description and '"fingerprinting"' in os_detected.description
    assert sum(1 for r in records if r.cves) == 5


def test_sample_detects_as_knowledge_base(sample):
    assert connectors.detect(sample(KB_SAMPLE).read_bytes()[:65536]) == "qualys_kb"
    assert connectors.get("qualys_kb").RECORD_KIND == "knowledge_base"


def test_vuln_without_qid_is_rejected_and_others_kept():
    records = parse_all("qualys_kb", _kb(
        FULL_VULN, "<VULN><SEVERITY_LEVEL>2</SEVERITY_LEVEL><TITLE>x</TITLE></VULN>",
        FULL_VULN.replace("91541", "91542").replace("2024-02-01T12:00:00Z", "last tuesday"),
        FULL_VULN.replace("91541", "91543"),
    ))
    assert [type(r) for r in records] == [VulnerabilityInfo, Rejected, Rejected, VulnerabilityInfo]
    assert records[1] == Rejected(position="VULN[2]", reason="VULN has no QID")
    assert records[2].position == "VULN[3]" and records[2].provider_id == "91542"
    assert "LAST_SERVICE_MODIFICATION_DATETIME" in records[2].reason
    assert records[3].vendor_id == "91543"


def test_detections_pushed_as_knowledge_base_is_a_format_error(sample):
    with pytest.raises(FormatError, match="HOST_LIST_VM_DETECTION_OUTPUT"):
        parse_all("qualys_kb", sample("qualys_hld_xml/jupiterone_detections.xml").read_bytes())


def test_non_xml_and_hostile_input_are_refused():
    with pytest.raises(FormatError):
        parse_all("qualys_kb", b"QID,Title\n1,x\n")
    xxe = (b'<?xml version="1.0"?><!DOCTYPE KNOWLEDGE_BASE_VULN_LIST_OUTPUT '
           b'[<!ENTITY xxe SYSTEM "file:///etc/passwd">]><KNOWLEDGE_BASE_VULN_LIST_OUTPUT><RESPONSE>'
           b"<VULN_LIST><VULN><QID>1</QID><TITLE>&xxe;</TITLE></VULN></VULN_LIST></RESPONSE>"
           b"</KNOWLEDGE_BASE_VULN_LIST_OUTPUT>")
    with pytest.raises(FormatError, match="entity"):
        parse_all("qualys_kb", xxe)
    with pytest.raises(FormatError, match="well-formed"):
        parse_all("qualys_kb", _kb(FULL_VULN)[:-40])
