import copy
import io
import json
from collections import Counter
from datetime import UTC, datetime

import pytest

import connectors
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from tests.connectors.conftest import parse_all

VULN = {
    "asset": {
        "uuid": "E6782DE6-E520-4FA8-8CA9-49286D7FCA2A",
        "agent_uuid": "9928ced55f8a4121b63c15b50cd461e6",
        "fqdn": "db-1.example.com",
        "hostname": "db-1",
        "ipv4": ["10.0.0.5", "not-an-ip"],
        "ipv6": "2001:db8::5",
        "netbios_name": "DB-1",
        "mac_address": "00:50:56:A6:60:BC",
        "operating_system": ["Ubuntu 22.04", "Linux"],
    },
    "plugin": {
        "id": 187315,
        "name": "SSH Terrapin Prefix Truncation Weakness (CVE-2023-48795)",
        "description": "The remote SSH server is vulnerable to a prefix truncation weakness.",
        "synopsis": "The remote SSH server is vulnerable.",
        "solution": "Contact the vendor for an update.",
        "cve": ["cve-2023-48795"],
        "cvss3_base_score": 5.9,
        "cvss3_vector": {"raw": "AV:N/AC:H/PR:N/UI:N/S:U/C:N/I:H/A:N"},
        "cvss_base_score": 5.4,
        "cvss_vector": {"raw": "AV:N/AC:H/Au:N/C:N/I:C/A:N"},
        "see_also": ["https://terrapin-attack.com"],
        "family": "Misc.",
    },
    "port": {"port": 22, "protocol": "TCP", "service": "ssh"},
    "severity": "medium",
    "severity_id": 2,
    "state": "REOPENED",
    "output": "Supports following ChaCha20-Poly1305 Client to Server algorithm",
    "first_found": "2024-01-02T03:04:05.123Z",
    "last_found": "2024-02-03T04:05:06Z",
    "indexed": "2024-02-03T04:10:00Z",
}


def _chunk(*vulns) -> bytes:
    return json.dumps(list(vulns)).encode()


def _records(path) -> list:
    return parse_all("tenable_io", path.read_bytes())


# ---- zero, one, many ----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[]", b" \n[ ]\n", b"\xef\xbb\xbf[]"])
def test_empty_chunk_yields_nothing(body):
    assert parse_all("tenable_io", body) == []


def test_one_vulnerability_fields():
    [record] = parse_all("tenable_io", _chunk(VULN))
    assert isinstance(record, FindingRecord)
    assert record.provider_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a|187315|22/tcp"
    assert record.title == "SSH Terrapin Prefix Truncation Weakness (CVE-2023-48795)"
    assert record.vendor_id == "187315"
    assert (record.severity, record.severity_original, record.severity_scale) == ("medium", "2", "nessus 0-4")
    assert record.cves == ["CVE-2023-48795"]
    assert record.status == "open"  # REOPENED
    assert record.cvss_score == 5.9
    assert record.cvss_vector == "CVSS:3.0/AV:N/AC:H/PR:N/UI:N/S:U/C:N/I:H/A:N"
    assert record.first_seen == datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    assert record.last_seen == datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2024, 2, 3, 4, 10, tzinfo=UTC)
    assert record.description.startswith("The remote SSH server is vulnerable to")
    assert record.remediation == "Contact the vendor for an update."
    assert record.evidence.startswith("Supports following ChaCha20")
    assert record.references == ["https://terrapin-attack.com"]
    assert record.extra["service"] == "ssh"
    assert record.extra["agent_uuid"] == "9928ced55f8a4121b63c15b50cd461e6"
    resource = record.resource
    assert resource.agent_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a"
    assert (resource.fqdn, resource.hostname, resource.netbios) == ("db-1.example.com", "db-1", "DB-1")
    assert resource.ipv4 == ["10.0.0.5"] and resource.ipv6 == ["2001:db8::5"]
    assert resource.mac == "00:50:56:a6:60:bc"
    assert resource.os == "Ubuntu 22.04 / Linux"  # the list joined: plain text, never "['Ubuntu 22.04', ...]"
    assert resource.host_key == "e6782de6-e520-4fa8-8ca9-49286d7fca2a"  # asset.uuid: provenance
    assert (resource.network, resource.instance_id) == (None, None)
    assert (record.scan, record.product) == (None, None)


def test_many_from_a_real_export_chunk(sample):
    everything = _records(sample("tenable_json/jupiterone_tenableio_vulns_export_chunk1.json"))
    assert len(everything) == 103
    records = [r for r in everything if isinstance(r, FindingRecord)]
    observations = [r for r in everything if isinstance(r, Observation)]
    assert (len(records), len(observations)) == (19, 84)  # severity "info": observations
    severities = Counter(r.severity for r in records)
    assert severities == {"high": 12, "medium": 5, "critical": 2}
    assert {r.status for r in records} == {"open"}
    assert len({r.provider_id for r in everything}) == 103
    # scan.uuid of the export item; the all-zero default network is no scope
    assert {r.scan for r in everything} == {"604e71f6-d732-4d8a-bd0d-7b8ea6c88196"}
    assert {r.resource.network for r in everything} == {None}
    assert {r.resource.host_key for r in everything} == {"e6782de6-e520-4fa8-8ca9-49286d7fca2a"}
    resource = everything[0].resource
    assert resource.agent_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a"
    assert (resource.fqdn, resource.hostname) == ("mbp16inch2021.localdomain", "maxosxj1")
    assert resource.os == "macOS 12.0"
    assert resource.ipv4 == [] and resource.mac is None  # "[REDACTED]" is no address
    netstat = everything[0]
    assert isinstance(netstat, Observation)
    assert netstat.provider_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a|14272|4599/tcp"
    assert netstat.name == "Netstat Portscanner (SSH)"
    assert (netstat.category, netstat.value) == ("port", "4599/tcp")
    assert (netstat.port, netstat.protocol) == (4599, "tcp")
    assert netstat.evidence is None  # "[REDACTED]"
    slack = next(o for o in observations if o.vendor_id == "140215")
    assert (slack.name, slack.category, slack.port) == ("Slack Installed (Mac OS X)", "software", None)
    assert Counter(o.category for o in observations) == {
        "other": 36, "port": 27, "software": 15, "identity": 2, "network": 2, "os": 1, "service": 1,
    }
    macos = next(r for r in records if r.vendor_id == "159106")
    assert macos.title == "macOS 12.x < 12.3 (HT213183)"
    assert macos.severity == "high"
    assert len(macos.cves) == 58 and macos.cves[0] == "CVE-2022-22648"
    assert macos.cvss_score == 9.8
    assert macos.cvss_vector == "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"
    assert macos.first_seen == datetime(2022, 5, 28, 15, 11, 31, 175000, tzinfo=UTC)
    assert macos.references == ["https://support.apple.com/en-gb/HT213183"]
    assert macos.extra["vpr_score"] == 7.4


def test_provider_ids_are_stable(sample):
    data = sample("tenable_json/jupiterone_tenableio_vulns_export_chunk1.json").read_bytes()
    first = [r.provider_id for r in parse_all("tenable_io", data)]
    again = copy.deepcopy(json.loads(data))
    for vuln in again:  # a later export: new times, same vulnerabilities, other order
        vuln["last_found"] = "2023-01-01T00:00:00Z"
    assert sorted(first) == sorted(r.provider_id for r in parse_all("tenable_io", _chunk(*reversed(again))))
    by_agent = dict(VULN, asset={"agent_uuid": "9928ced55f8a4121b63c15b50cd461e6", "ipv4": "10.0.0.5"})
    [record] = parse_all("tenable_io", _chunk(by_agent))
    assert record.provider_id == "9928ced5-5f8a-4121-b63c-15b50cd461e6|187315|22/tcp"


# ---- states, rejects, severity ------------------------------------------------------


def test_states():
    fixed = dict(VULN, state="FIXED", last_fixed="2024-03-01T00:00:00Z", indexed=None)
    new = dict(VULN, state="NEW", port={"port": 443, "protocol": "TCP"})
    records = parse_all("tenable_io", _chunk(fixed, new))
    assert [r.status for r in records] == ["fixed", "open"]
    assert records[0].provider_timestamp == datetime(2024, 3, 1, tzinfo=UTC)


def test_bad_items_rejected_and_others_kept():
    no_plugin_id = dict(VULN, plugin={"name": "x"})
    odd_state = dict(VULN, state="SNOOZED", port={"port": 80, "protocol": "TCP"})
    no_identifier = dict(VULN, asset={"ipv4": "[REDACTED]"})
    records = parse_all("tenable_io", _chunk(VULN, no_plugin_id, "text", odd_state, no_identifier, VULN))
    kinds = [type(r).__name__ for r in records]
    # the two identical VULN items are not consecutive, so both come out
    assert kinds == ["FindingRecord", "Rejected", "Rejected", "Rejected", "Rejected", "FindingRecord"]
    assert records[1] == Rejected(position="[1]", reason="'plugin.id' is required")
    assert records[2].position == "[2]" and "object" in records[2].reason
    assert records[3].position == "[3]" and "SNOOZED".lower() in records[3].reason
    assert records[3].provider_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a|187315|80/tcp"
    assert records[4].position == "[4]" and "identifier" in records[4].reason


def test_severity_word_when_no_severity_id():
    vuln = dict(VULN, severity="critical")
    del vuln["severity_id"]
    [record] = parse_all("tenable_io", _chunk(vuln))
    assert (record.severity, record.severity_original) == ("critical", "critical")


def test_zero_cvss_without_vector_is_no_score():
    plugin = dict(VULN["plugin"], cvss3_base_score=0, cvss_base_score=0)
    del plugin["cvss3_vector"], plugin["cvss_vector"]
    [record] = parse_all("tenable_io", _chunk(dict(VULN, plugin=plugin)))
    assert (record.cvss_score, record.cvss_vector) == (None, None)


# ---- Tenable.sc analysis pages --------------------------------------------------------


def test_tenable_sc_analysis_page(sample):
    records = _records(sample("tenable_json/pytenable_tenablesc_analysis_vulndetails_page0.json"))
    assert len(records) == 5
    assert all(isinstance(r, Observation) for r in records)  # severity 0 (Info) items only
    assert {r.product for r in records} == {"Tenable.sc"}
    assert [r.vendor_id for r in records][:3] == ["10107", "10107", "10114"]
    first = records[0]
    assert first.provider_id == "pfsense.home.cugnet.net|10107|80/tcp"
    assert first.name == "HTTP Server Type and Version"
    assert (first.category, first.value, first.port, first.protocol) == ("service", "80/tcp", 80, "tcp")
    assert first.resource.fqdn == "pfsense.home.cugnet.net"
    assert first.resource.ipv4 == ["192.168.100.1"]
    assert first.evidence == "The remote web server type is :\n\nnginx"
    assert first.first_seen == first.last_seen == datetime(2018, 12, 17, 19, 16, 22, tzinfo=UTC)
    icmp = records[2]
    assert icmp.provider_id == "pfsense.home.cugnet.net|10114|0/icmp"
    assert icmp.value == "The difference between the local and remote clocks is 1 second."
    page1 = _records(sample("tenable_json/pytenable_tenablesc_analysis_vulndetails_page1.json"))
    assert len(page1) == 5 and not {r.provider_id for r in page1} & {r.provider_id for r in records}


def test_tenable_sc_error_response_is_a_format_error():
    body = json.dumps({"type": "regular", "response": "", "error_code": 146, "error_msg": "Invalid login"})
    with pytest.raises(FormatError, match="Invalid login"):
        parse_all("tenable_io", body.encode())


# ---- refused input and detection ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"<xml/>", "not JSON"),
        (b'{"findings": []}', "not a Tenable.sc analysis response"),
        (b'[{"asset": {"uuid": "a"}, "plugin": {"id": 1}', "not well-formed JSON"),
        (b'[{"asset": {}}, nonsense]', "not well-formed JSON"),
    ],
)
def test_bad_documents_are_format_errors(body, message):
    with pytest.raises(FormatError, match=message):
        parse_all("tenable_io", body)


def test_har_recording_is_not_a_chunk(sample):
    data = sample("tenable_json/jupiterone_tenableio_fetch-vulnerabilities_recording.har").read_bytes()
    assert connectors.detect(data[:65536]) != "tenable_io"
    with pytest.raises(FormatError):
        parse_all("tenable_io", data)


@pytest.mark.parametrize(
    "name",
    [
        "jupiterone_tenableio_vulns_export_chunk1.json",
        "pytenable_tenablesc_analysis_vulndetails_page0.json",
        "pytenable_tenablesc_analysis_vulndetails_page1.json",
    ],
)
def test_detect(sample, name):
    data = sample(f"tenable_json/{name}").read_bytes()
    assert connectors.detect(data[:65536]) == "tenable_io"
    assert connectors.detect(data[:4096]) == "tenable_io"


def test_detect_inline_chunk():
    assert connectors.detect(_chunk(VULN)) == "tenable_io"
    assert connectors.detect(b"[]") != "tenable_io"


def test_parse_does_not_close_the_stream():
    stream = io.BytesIO(_chunk(VULN))
    assert len(list(connectors.get("tenable_io").parse(stream, ParseOptions()))) == 1
    assert not stream.closed


def test_asset_network_instance_and_scan_provenance():
    asset = dict(VULN["asset"], network_id="7c3ac6e3-6e0a-4e57-a05c-fd1d1ab1e6f2",
                 aws_ec2_instance_id="i-0abc1234def567890", aws_ec2_name="db-1-prod",
                 operating_system=["Linux Kernel 5.15"])
    scan = {"uuid": "8d1bd2c4-ae5a-4d62-b4b8-8d5d8d6b4c1e", "schedule_uuid": "template-0c7a",
            "started_at": "2024-02-03T03:00:00Z", "completed_at": "2024-02-03T04:00:00Z"}
    [record] = parse_all("tenable_io", _chunk(dict(VULN, asset=asset, scan=scan)))
    resource = record.resource
    assert resource.network == "7c3ac6e3-6e0a-4e57-a05c-fd1d1ab1e6f2"
    assert resource.instance_id == "i-0abc1234def567890"
    assert resource.cloud_name == "db-1-prod"
    assert resource.os == "Linux Kernel 5.15"
    assert resource.agent_id == resource.host_key == "e6782de6-e520-4fa8-8ca9-49286d7fca2a"
    assert record.scan == "8d1bd2c4-ae5a-4d62-b4b8-8d5d8d6b4c1e"
    only_schedule = dict(VULN, scan={"schedule_uuid": "template-0c7a"},
                         asset=dict(VULN["asset"], network_id="00000000-0000-0000-0000-000000000000"))
    [record] = parse_all("tenable_io", _chunk(only_schedule))
    assert (record.scan, record.resource.network) == ("template-0c7a", None)


def test_info_severity_is_an_observation():
    info = dict(VULN, severity="info", severity_id=0, output="Remote operating system : Linux Kernel 5.15\n",
                plugin={"id": 11936, "name": "OS Identification", "family": "General"},
                port={"port": 0, "protocol": "TCP", "service": "general"})
    [record] = parse_all("tenable_io", _chunk(info))
    assert isinstance(record, Observation)
    assert record.provider_id == "e6782de6-e520-4fa8-8ca9-49286d7fca2a|11936|0/tcp"
    assert (record.name, record.category, record.value) == ("OS Identification", "os", "Linux Kernel 5.15")
    assert (record.port, record.protocol, record.vendor_id) == (None, None, "11936")
    assert record.evidence == "Remote operating system : Linux Kernel 5.15"
    assert record.last_seen == datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
