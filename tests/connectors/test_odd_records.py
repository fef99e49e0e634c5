"""One odd record never fails a whole file (DESIGN rule 7), connector by connector.

Each test feeds a file holding one record with a bad value (a non-numeric severity, a
malformed date, a missing title, a wrong type where an object is expected, an unknown
enum) among good ones, and checks that the good records come out and the odd one is a
``Rejected`` naming its position and the reason.  ``FormatError`` is only for a body that
is not the format or not well-formed.
"""

import csv
import io
import json

import connectors
from connectors.model import Rejected
from tests.connectors import test_nessus as nessus_doc
from tests.connectors import test_qualys_hld as hld_doc
from tests.connectors import test_qualys_kb as kb_doc
from tests.connectors import test_qualys_scan_xml as scan_doc
from tests.connectors.conftest import parse_all
from tests.connectors.test_canonical import GOOD as CANONICAL
from tests.connectors.test_checkpoint import REALISTIC as CLOUDGUARD
from tests.connectors.test_graph_alert import LEGACY as GRAPH_ALERT
from tests.connectors.test_ocsf import VULNERABILITY as OCSF_VULNERABILITY
from tests.connectors.test_tenable_io import VULN as TENABLE_IO_VULN


def _kinds(records: list) -> list[str]:
    return [type(record).__name__ for record in records]


def _json(records, envelope: str | None = None) -> bytes:
    return json.dumps({envelope: records} if envelope else records).encode()


def test_every_connector_has_an_odd_record_test():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(connectors.formats()) <= tested


def test_asc_assessment(sample):
    body = json.loads(sample("azure_defender_rest/2021-06-01_ListAssessments_example.json").read_bytes())
    good = body["responses"]["200"]["body"]["value"] if "responses" in body else body["value"]
    odd = {**good[0], "properties": "Unhealthy"}  # a string where an object is expected
    records = parse_all("asc_assessment", _json([good[0], odd, good[1]], "value"))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0], records[2]] == parse_all("asc_assessment", _json(good[:2], "value"))
    assert records[1] == Rejected(
        position="value[1]",
        reason="'properties' is required",
        provider_id=odd["id"],
    )


def test_asc_csv(sample):
    header, first, *rest = sample("azure_security_center_csv/many_vulns.csv").read_bytes().split(b"\n")
    rows = list(csv.reader(io.StringIO((header + b"\n" + first).decode("utf-8-sig"))))
    odd = list(rows[1])
    odd[rows[0].index("severity")] = "Urgent"
    out = io.StringIO()
    csv.writer(out).writerows([rows[0], rows[1], odd, rows[1]])
    records = parse_all("asc_csv", out.getvalue().encode())
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert records[0].title == records[2].title == "Virtual networks should be protected by Azure Firewall"
    assert records[1] == Rejected(position="line 3", reason="'severity' 'Urgent' is not Low, Medium or High",
                                  provider_id=records[0].provider_id)


def test_asff(sample):
    good = json.loads(sample("aws_asff/asff_one_vuln.json").read_bytes())
    good = good["Findings"] if isinstance(good, dict) else good
    odd = {**good[0], "Id": "odd-1", "Severity": {"Label": "SEVERE"}}  # an unknown enum
    records = parse_all("asff", _json([good[0], odd, good[0]], "Findings"))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert records[0].provider_id == records[2].provider_id == good[0]["Id"]
    assert records[1] == Rejected(
        position="Findings[1]",
        reason="'Severity.Label' 'SEVERE' is not an ASFF severity label",
        provider_id="odd-1",
    )


def test_canonical():
    odd = dict(CANONICAL, id="rec-odd", firstSeen="yesterday")
    records = parse_all("canonical", _json([CANONICAL, odd, dict(CANONICAL, id="rec-3")], "findings"))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[2].provider_id] == ["rec-1", "rec-3"]
    assert records[1] == Rejected(
        position="findings[1]",
        reason="'firstSeen' is not an ISO 8601 date-time: 'yesterday'",
        provider_id="rec-odd",
    )


def test_checkpoint():
    odd = dict(CLOUDGUARD, id="odd-1", severity=7)
    records = parse_all("checkpoint", _json([CLOUDGUARD, odd, dict(CLOUDGUARD, id="good-2")], "findings"))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert records[0].title == records[2].title == CLOUDGUARD["ruleName"]
    assert records[1].position == "findings[1]"
    assert records[1].reason == (
        "'severity' '7' is not a CloudGuard severity (Informational, Low, Medium, High, Critical)")


def test_graph_alert():
    odd = dict(GRAPH_ALERT, id="odd-1", createdDateTime="last Tuesday")
    records = parse_all("graph_alert", _json([GRAPH_ALERT, odd, dict(GRAPH_ALERT, id="good-2")], "value"))
    assert _kinds(records) == ["AlertRecord", "Rejected", "AlertRecord"]
    assert [records[0].provider_id, records[2].provider_id] == [GRAPH_ALERT["id"], "good-2"]
    assert records[1] == Rejected(position="value[1]",
                                  reason="'createdDateTime' is not an ISO 8601 date-time: 'last Tuesday'",
                                  provider_id="odd-1")


def test_nessus():
    odd_date = "<first_found>sometime last week</first_found>"
    body = nessus_doc._doc(nessus_doc._host("10.0.0.1", nessus_doc._item("100", port="80"),
                                              nessus_doc._item("101", port="81", body=odd_date),
                                              nessus_doc._item("102", port="82", severity="high")),
                            nessus_doc._host("10.0.0.2", nessus_doc._item("100", port="80")))
    records = parse_all("nessus", body)
    assert _kinds(records) == ["FindingRecord", "Rejected", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[3].provider_id] == ["10.0.0.1|100|80/tcp", "10.0.0.2|100|80/tcp"]
    assert records[1] == Rejected(position="ReportHost[1]/ReportItem[2]",
                                  reason="first_found is not a date Tenable writes: 'sometime last week'",
                                  provider_id="10.0.0.1|101|81/tcp")
    assert records[2] == Rejected(position="ReportHost[1]/ReportItem[3]",
        reason="ReportItem has no usable severity (severity 0-4, risk_factor or CVSS score)",
                                  provider_id="10.0.0.1|102|82/tcp")


def test_ocsf():
    odd = {**OCSF_VULNERABILITY, "finding_info": {**OCSF_VULNERABILITY["finding_info"], "uid": "odd",
                                                   "last_seen_time_dt": "not a time"}}
    records = parse_all("ocsf", _json([OCSF_VULNERABILITY, odd, OCSF_VULNERABILITY]))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert records[0].provider_id == records[2].provider_id == OCSF_VULNERABILITY["finding_info"]["uid"]
    assert records[1] == Rejected(
        position="[1]",
        reason="'last_seen_time_dt' is not a timestamp: 'not a time'",
        provider_id="odd",
    )


def test_qualys_csv():
    header = '"IP","DNS","QID","Title","Type","Severity","Port","Protocol","Vuln Status","Last Detected"\n'
    rows = ('"10.0.0.1","a.example","38739","SSH","Vuln","3","22","tcp","Active","05/01/2024 10:00:00"\n'
            '"10.0.0.1","a.example","38740","SSH 2","Vuln","high-ish","22","tcp","Active",'
            '"05/01/2024 10:00:00"\n'
            '"10.0.0.2","b.example","38739","SSH","Vuln","3","22","tcp","Active","05/01/2024 10:00:00"\n')
    records = parse_all("qualys_csv", (header + rows).encode())
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[2].provider_id] == (
        ["10.0.0.1|38739|22/tcp", "10.0.0.2|38739|22/tcp"])
    assert records[1] == Rejected(
        position="line 3",
        reason="Severity must be 1-5 or a severity word, not 'high-ish'",
        provider_id="10.0.0.1|38740|22/tcp",
    )


def test_qualys_hld():
    hld = hld_doc
    body = hld._hld(hld._host(hld._detection("38170"),
                              hld._detection("38171", LAST_FOUND_DATETIME="31/31/2024"),
                              hld._detection("38172", PORT="444")))
    records = parse_all("qualys_hld", body)
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[2].provider_id] == ["101|38170|443/tcp", "101|38172|444/tcp"]
    assert records[1] == Rejected(position="HOST[1]/DETECTION[2]",
                                  reason="LAST_FOUND_DATETIME is not an ISO 8601 date-time: '31/31/2024'",
                                  provider_id="101|38171|443/tcp")


def test_qualys_kb():
    odd = kb_doc.FULL_VULN.replace("<QID>91541</QID>", "<QID>91542</QID>").replace(
        "<SEVERITY_LEVEL>5</SEVERITY_LEVEL>", "<SEVERITY_LEVEL>urgent</SEVERITY_LEVEL>")
    records = parse_all("qualys_kb", kb_doc._kb(kb_doc.FULL_VULN, odd, kb_doc.FULL_VULN))
    assert _kinds(records) == ["VulnerabilityInfo", "Rejected", "VulnerabilityInfo"]
    assert records[0] == records[2] and records[0].severity == "critical"
    assert records[1] == Rejected(position="VULN[2]", reason="SEVERITY_LEVEL must be 1-5, not 'urgent'",
                                  provider_id="91542")


def test_qualys_scan_xml():
    xml = scan_doc
    host = ("<HOST><IP>10.0.0.8</IP><VULN_INFO_LIST>" + xml._vuln_info("200")
            + xml._vuln_info("201").replace("2024-04-01T00:00:00Z", "April 1st")
            + xml._vuln_info("202") + "</VULN_INFO_LIST></HOST>")
    records = parse_all("qualys_scan_xml", xml._report(host, xml._details("200") + xml._details("201")
                                                       + xml._details("202")))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[2].provider_id] == (
        ["10.0.0.8|200|443/tcp", "10.0.0.8|202|443/tcp"])
    assert records[1] == Rejected(position="HOST[1]/VULN_INFO[2]",
                                  reason="LAST_FOUND is not an ISO 8601 date-time: 'April 1st'",
                                  provider_id="10.0.0.8|201|443/tcp")


def test_tenable_csv():
    header = "Plugin ID,CVE,CVSS,Risk,Host,Protocol,Port,Name\n"
    rows = ("187315,CVE-2023-48795,5.4,Medium,10.0.0.1,tcp,22,SSH Terrapin\n"
            "187316,,,Urgent,10.0.0.1,tcp,23,Odd risk\n"
            "187315,CVE-2023-48795,5.4,Medium,10.0.0.2,tcp,22,SSH Terrapin\n")
    records = parse_all("tenable_csv", (header + rows).encode())
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    assert [records[0].provider_id, records[2].provider_id] == (
        ["10.0.0.1|187315|22/tcp", "10.0.0.2|187315|22/tcp"])
    assert records[1] == Rejected(
        position="line 3",
        reason="the row has no usable severity, risk or CVSS score",
        provider_id="10.0.0.1|187316|23/tcp",
    )


def test_tenable_io():
    odd = dict(TENABLE_IO_VULN, first_found="the day before yesterday", port={"port": 23, "protocol": "TCP"})
    other = dict(TENABLE_IO_VULN, port={"port": 24, "protocol": "TCP"})
    records = parse_all("tenable_io", _json([TENABLE_IO_VULN, odd, other]))
    assert _kinds(records) == ["FindingRecord", "Rejected", "FindingRecord"]
    uuid = "e6782de6-e520-4fa8-8ca9-49286d7fca2a"
    assert [records[0].provider_id, records[2].provider_id] == (
        [f"{uuid}|187315|22/tcp", f"{uuid}|187315|24/tcp"])
    assert records[1] == Rejected(position="[1]",
        reason="'first_found' is not a date Tenable writes: 'the day before yesterday'",
                                  provider_id=f"{uuid}|187315|23/tcp")


WINDOWS_EVENT = {"@timestamp": "2026-12-01T10:00:00Z",
                 "winlog": {"event_id": 4625, "computer_name": "ws-1.contoso.com",
                            "event_data": {"TargetUserName": "alice", "IpAddress": "203.0.113.7"}}}


def test_windows_events():
    odd = {**WINDOWS_EVENT, "@timestamp": "yesterday"}  # a malformed date
    records = parse_all("windows_events", _json([WINDOWS_EVENT, odd, WINDOWS_EVENT], "events"))
    assert _kinds(records) == ["SecurityEventRecord", "Rejected", "SecurityEventRecord"]
    assert records[0].kind == "logon_failure" and records[0].source_ip == "203.0.113.7"
    assert records[0].resource.fqdn == "ws-1.contoso.com" and records[0].user == "alice"
    assert records[1].position == "events[1]" and "yesterday" in records[1].reason


OCSF_LOGON = {"class_uid": 3002, "category_uid": 3, "activity_id": 1, "status_id": 1,
              "time": 1764583200000, "user": {"name": "root"}, "src_endpoint": {"ip": "198.51.100.4"},
              "device": {"hostname": "db-2"}}


def test_ocsf_events():
    odd = {**OCSF_LOGON, "class_uid": 2002}  # an OCSF finding among the events
    records = parse_all("ocsf_events", _json([OCSF_LOGON, odd, OCSF_LOGON]))
    assert _kinds(records) == ["SecurityEventRecord", "Rejected", "SecurityEventRecord"]
    assert records[0].kind == "logon_success"
    assert records[0].occurred_at.isoformat() == "2025-12-01T10:00:00+00:00"
    assert records[1].position == "[1]" and "class_uid" in records[1].reason


TI_INDICATOR = {"targetProduct": "Azure Sentinel", "action": "alert",
                "expirationDateTime": "2027-01-01T00:00:00Z", "threatType": "C2", "tlpLevel": "amber",
                "confidence": 80, "networkIPv4": "198.51.100.1", "externalId": "e1"}


def test_graph_tiindicator():
    odd = {**TI_INDICATOR, "networkIPv4": "not-an-ip", "externalId": "e2"}  # a bad observable
    records = parse_all("graph_tiindicator", _json([TI_INDICATOR, odd, TI_INDICATOR], "value"))
    assert _kinds(records) == ["IndicatorRecord", "Rejected", "IndicatorRecord"]
    assert (records[0].observable_type, records[0].value) == ("ipv4", "198.51.100.1")
    assert records[1] == Rejected(position="value[1]", reason="'not-an-ip' is not an IP address",
                                  provider_id="e2")


def _stix_indicator(pattern: str, n: int) -> dict:
    return {"type": "indicator", "spec_version": "2.1",
            "id": f"indicator--0000000{n}-0000-4000-8000-000000000000",
            "created": "2026-11-01T00:00:00Z", "modified": "2026-11-01T00:00:00Z", "pattern": pattern,
            "pattern_type": "stix", "valid_from": "2026-11-01T00:00:00Z",
            "indicator_types": ["malicious-activity"]}


def test_stix21():
    bundle = {"type": "bundle", "id": "bundle--00000000-0000-4000-8000-000000000000",
              "objects": [_stix_indicator("[ipv4-addr:value = '192.0.2.10']", 1),
                          _stix_indicator("[process:name = 'evil.exe']", 2),  # a pattern not evaluated
                          _stix_indicator("[domain-name:value = 'c2.example.net']", 3)]}
    records = parse_all("stix21", json.dumps(bundle).encode())
    assert _kinds(records) == ["IndicatorRecord", "Rejected", "IndicatorRecord"]
    assert (records[2].observable_type, records[2].value) == ("domain", "c2.example.net")
    assert records[1].position == "objects[1]" and "process:name" in records[1].reason
    assert records[1].provider_id == "indicator--00000002-0000-4000-8000-000000000000"
