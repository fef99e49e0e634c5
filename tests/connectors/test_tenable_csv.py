import csv
import io
from collections import Counter
from datetime import UTC, datetime

import pytest

import connectors
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from tests.connectors.conftest import parse_all

NESSUS_HEADER = [
    "Plugin ID", "CVE", "CVSS", "Risk", "Host", "Protocol", "Port", "Name", "Synopsis",
    "Description", "Solution", "See Also", "Plugin Output",
]
ROW = {
    "Plugin ID": "187315",
    "CVE": "CVE-2023-48795",
    "CVSS": "5.4",
    "Risk": "Medium",
    "Host": "192.168.0.100",
    "Protocol": "tcp",
    "Port": "22",
    "Name": "SSH Terrapin Prefix Truncation Weakness (CVE-2023-48795)",
    "Synopsis": "The remote SSH server is vulnerable to a mitm prefix truncation attack.",
    "Description": "The remote SSH server is vulnerable to a prefix truncation weakness\nknown as Terrapin.",
    "Solution": "Contact the vendor for an update.",
    "See Also": "https://terrapin-attack.com\nhttps://seclists.org/oss-sec/2023/q4/292",
    "Plugin Output": "Supports following ChaCha20-Poly1305 Client to Server algorithm",
}


def _csv(*rows: dict, header: list[str] = NESSUS_HEADER, preamble: str = "") -> bytes:
    out = io.StringIO()
    out.write(preamble)
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(name, "") for name in header])
    return out.getvalue().encode()


def _records(path) -> list:
    return parse_all("tenable_csv", path.read_bytes())


# ---- zero, one, many ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        _csv(),
        b"\xef\xbb\xbf" + _csv(),
        _csv() + b",,,,,,,,,,,,\r\n,,,,,,,,,,,,\r\n",
        _csv(preamble="Tenable export\r\nGenerated: today\r\n\r\n"),
    ],
)
def test_header_only_yields_nothing(body):
    assert parse_all("tenable_csv", body) == []


def test_one_row_fields():
    [record] = parse_all("tenable_csv", _csv(ROW))
    assert isinstance(record, FindingRecord)
    assert record.provider_id == "192.168.0.100|187315|22/tcp"
    assert record.title == "SSH Terrapin Prefix Truncation Weakness (CVE-2023-48795)"
    assert record.vendor_id == "187315"
    assert (record.severity, record.severity_original, record.severity_scale) == (
        "medium", "Medium", "tenable risk factor",
    )
    assert record.cves == ["CVE-2023-48795"]
    assert (record.cvss_score, record.cvss_vector) == (5.4, None)
    assert record.description.endswith("known as Terrapin.")
    assert record.remediation == "Contact the vendor for an update."
    assert record.evidence == "Supports following ChaCha20-Poly1305 Client to Server algorithm"
    assert record.references == ["https://terrapin-attack.com", "https://seclists.org/oss-sec/2023/q4/292"]
    assert record.resource.ipv4 == ["192.168.0.100"] and record.resource.name == "192.168.0.100"
    assert record.status == "open"
    assert record.first_seen is None and record.last_seen is None


def test_many_nessus_default_and_all_columns(sample):
    default = _records(sample("tenable_csv/nessus_many_vuln2-default.csv"))
    everything = _records(sample("tenable_csv/nessus_many_vuln2-all.csv"))
    # 30 rows: plugin 22964 twice in a row on 443/tcp (two services) is one record
    assert len(default) == len(everything) == 29
    assert [r.provider_id for r in default] == [r.provider_id for r in everything]
    # Risk "None" rows are observations, never findings
    assert Counter(type(r).__name__ for r in default) == {"Observation": 28, "FindingRecord": 1}
    assert {r.product for r in default + everything} == {"Nessus"}  # Plugin ID, Risk, Host
    assert {r.resource.ipv4[0] for r in default} == {"52.208.101.182"}
    assert {r.resource.host_key for r in default} == {"52.208.101.182"}
    web = default[0]
    assert isinstance(web, Observation)
    assert web.provider_id == "52.208.101.182|10107|80/tcp"
    assert (web.name, web.category, web.vendor_id) == ("HTTP Server Type and Version", "service", "10107")
    assert (web.port, web.protocol, web.value) == (80, "tcp", "80/tcp")
    assert web.evidence == "The remote web server type is :\n\nCowboy"
    tls = next(r for r in default if r.provider_id == "52.208.101.182|22964|443/tcp")
    assert tls.evidence == (
        "A TLSv1 server answered on this port.\n\nA web server is running on this port through TLSv1."
    )
    assert tls.category == "service"
    weak_hash = next(r for r in default if r.vendor_id == "95631")
    assert isinstance(weak_hash, Observation)  # Risk "None" though it names CVE-2004-2761
    csp = next(r for r in everything if r.vendor_id == "104743")
    assert (csp.severity, csp.cvss_score) == ("medium", 6.5)  # the v3 column wins when present
    assert next(r for r in default if r.vendor_id == "104743").cvss_score == 6.1


def test_many_tenable_io_csv(sample):
    records = _records(sample("tenable_csv/tenable_many_vuln.csv"))
    assert len(records) == 9  # 20 rows: one per CVE
    mariadb = records[1]
    assert mariadb.provider_id == "ip-127-0-0-1.us-west-2.compute.internal|176703|0/tcp"
    assert mariadb.title == "Amazon Linux 2 : mariadb (ALAS-2023-2057)"
    assert len(mariadb.cves) == 10 and mariadb.cves[:2] == ["CVE-2021-46666", "CVE-2021-46663"]
    assert (mariadb.severity, mariadb.severity_original) == ("high", "3")
    assert mariadb.severity_scale == "nessus 0-4"
    assert mariadb.cvss_score == 7.5
    assert mariadb.cvss_vector == "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"
    assert mariadb.status == "open"  # "Active"
    assert mariadb.first_seen == mariadb.last_seen == datetime(2023, 6, 8, 1, 58, 56, 166000, tzinfo=UTC)
    resource = mariadb.resource
    assert resource.fqdn == "ip-127-0-0-1.us-west-2.compute.internal"
    assert resource.ipv4 == ["127.0.0.1"]
    assert resource.os == "Linux Kernel 4.14.313-235.533.amzn2.x86_64 on Amazon Linux 2"
    assert [r.resource.fqdn for r in records].count("ip-192-168-1-110.us-west-2.compute.internal") == 2
    older = records[3]
    assert older.vendor_id == "164329"
    assert older.first_seen == datetime(2023, 5, 19, 15, 8, 24, 420000, tzinfo=UTC)


def test_many_tenable_sc_csv(sample):
    records = _records(sample("tenable_csv/issue_11102.csv"))
    assert [r.provider_id for r in records] == [
        "1.2.3.4|42873|443/tcp", "2.3.4.5|42873|443/tcp", "1.2.3.4|42873|8443/tcp",
    ]
    sweet32 = records[0]
    assert sweet32.title == "SSL Medium Strength Cipher Suites Supported (SWEET32)"
    assert (sweet32.severity, sweet32.severity_original) == ("high", "High")
    assert sweet32.cves == ["CVE-2016-2183"]
    assert sweet32.cvss_score == 7.5
    assert sweet32.cvss_vector == "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"
    assert sweet32.first_seen == datetime(2024, 2, 9, 10, 48, 42, tzinfo=UTC)
    assert sweet32.last_seen == datetime(2024, 10, 17, 17, 24, 54, tzinfo=UTC)
    assert sweet32.resource.mac == "fa:16:3e:e6:0b:98"
    assert sweet32.evidence.startswith("Medium Strength Ciphers")  # "Plugin Output: " dropped
    assert sweet32.remediation.startswith("Reconfigure the affected application")  # "Steps to Remediate"
    sql = _records(sample("tenable_csv/issue_9612.csv"))
    assert len(sql) == 3
    assert {r.resource.netbios for r in sql} == {"ECODARCHDB"}  # "WORKGROUP\ECODARCHDB"
    assert (sql[0].severity, sql[0].cvss_score) == ("critical", 10.0)


def test_sc_times_with_zone_and_blank_rows(sample):
    records = _records(sample("tenable_csv/nessus_many_vuln.csv"))  # 533 rows, most blank
    assert [r.vendor_id for r in records] == ["35291", "51192", "57582", "65821"]
    assert records[0].first_seen == datetime(2021, 1, 5, 17, 24, 8, tzinfo=UTC)  # 10:24:08 MST
    assert records[3].cves == ["CVE-2013-2566", "CVE-2015-2808"]
    assert records[0].evidence.startswith("The following certificates were part of the certificate chain")


def test_scores_without_decimal_point(sample):
    records = _records(sample("tenable_csv/nessus-template.csv"))
    assert [(r.vendor_id, r.severity, r.cvss_score) for r in records] == [
        ("42873", "high", 7.5), ("11213", "medium", 5.3), ("187315", "medium", 5.9),
        ("200162", "critical", 9.8), ("200798", "medium", 4.9),
    ]
    assert records[3].provider_id == "192.168.0.101|200162|8080/tcp"


# ---- merging, rejects, states -------------------------------------------------------


def test_only_consecutive_repeats_are_merged():
    second_cve = dict(ROW, CVE="CVE-2023-99999")
    other = dict(ROW, **{"Plugin ID": "11213", "Port": "443", "CVE": "", "Name": "HTTP TRACE"})
    records = parse_all("tenable_csv", _csv(ROW, second_cve, other, ROW))
    assert [r.provider_id for r in records] == [
        "192.168.0.100|187315|22/tcp", "192.168.0.100|11213|443/tcp", "192.168.0.100|187315|22/tcp",
    ]
    assert records[0].cves == ["CVE-2023-48795", "CVE-2023-99999"]
    assert records[2].cves == ["CVE-2023-48795"]


def test_rows_without_plugin_id_or_host_are_rejected_with_line_numbers():
    no_plugin = dict(ROW, **{"Plugin ID": ""})
    no_host = dict(ROW, Host="", Port="80")
    rows = (ROW, no_plugin, dict(ROW, Port="23"), no_host, dict(ROW, Port="24"))
    records = parse_all("tenable_csv", _csv(*rows))
    # ROW spans 3 lines (two multi-line cells): rows start on lines 2, 5, 8, 11 and 14
    assert [type(r).__name__ for r in records] == [
        "FindingRecord", "Rejected", "FindingRecord", "Rejected", "FindingRecord",
    ]
    assert records[1] == Rejected(position="line 5", reason="the row has no plugin id")
    assert records[3].position == "line 11" and "host" in records[3].reason


def test_vulnerability_state_and_identifiers():
    header = [
        "Plugin ID", "Name", "Risk", "Severity", "Host", "IP Address", "FQDN", "NetBios", "MAC Address",
        "Asset UUID", "Port", "Protocol", "Vulnerability State", "First Found", "Last Found", "Last Fixed",
    ]
    fixed = {
        "Plugin ID": "10", "Name": "Old bug", "Risk": "Low", "Severity": "1",
        "Host": "web-1.example.com", "IP Address": "10.0.0.7", "FQDN": "web-1.example.com",
        "NetBios": "WEB-1", "MAC Address": "00-50-56-A6-60-BC",
        "Asset UUID": "0B5A1D8E9F2C4D3E8A7B6C5D4E3F2A1B", "Port": "0", "Protocol": "TCP",
        "Vulnerability State": "Fixed", "First Found": "2024-01-01T00:00:00Z",
        "Last Found": "2024-02-01T00:00:00Z", "Last Fixed": "2024-03-01T00:00:00Z",
    }
    resurfaced = dict(fixed, **{"Plugin ID": "11", "Vulnerability State": "Resurfaced"})
    weird = dict(fixed, **{"Plugin ID": "12", "Vulnerability State": "Sleeping"})
    first, second, third = parse_all("tenable_csv", _csv(fixed, resurfaced, weird, header=header))
    assert (first.status, second.status) == ("fixed", "open")
    assert first.provider_id == "0b5a1d8e-9f2c-4d3e-8a7b-6c5d4e3f2a1b|10|0/tcp"
    assert first.provider_timestamp == datetime(2024, 3, 1, tzinfo=UTC)
    assert first.last_seen == datetime(2024, 2, 1, tzinfo=UTC)
    assert (first.severity, first.severity_scale) == ("low", "nessus 0-4")
    resource = first.resource
    assert resource.agent_id == "0b5a1d8e-9f2c-4d3e-8a7b-6c5d4e3f2a1b"
    assert (resource.fqdn, resource.netbios) == ("web-1.example.com", "WEB-1")
    assert resource.mac == "00:50:56:a6:60:bc"
    assert resource.ipv4 == ["10.0.0.7"]
    assert isinstance(third, Rejected) and "sleeping" in third.reason and third.position == "line 4"


def test_header_names_are_case_insensitive():
    header = [name.upper() for name in NESSUS_HEADER]
    [record] = parse_all("tenable_csv", _csv({k.upper(): v for k, v in ROW.items()}, header=header))
    assert record.provider_id == "192.168.0.100|187315|22/tcp"


# ---- refused input and detection ------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'"IP","DNS","QID","Title","Severity"\n"10.0.0.1","a","38739","x","3"\n',
        b"<NessusClientData_v2/>",
        b"",
    ],
)
def test_not_a_tenable_csv_is_a_format_error(body):
    with pytest.raises(FormatError, match="not a Tenable CSV export"):
        parse_all("tenable_csv", body)


@pytest.mark.parametrize(
    "name",
    [
        "issue_11102.csv", "issue_9612.csv", "nessus-template.csv", "nessus_many_vuln.csv",
        "nessus_many_vuln2-all.csv", "nessus_many_vuln2-default.csv", "tenable_many_vuln.csv",
    ],
)
def test_detect(sample, name):
    assert connectors.detect(sample(f"tenable_csv/{name}").read_bytes()[:65536]) == "tenable_csv"


def test_detect_refuses_binary():
    assert connectors.detect(b"\x00\x01Plugin ID,Host\x00\n") != "tenable_csv"


def test_large_cells_and_open_stream():
    big = dict(ROW, **{"Plugin Output": "x" * 300_000})
    stream = io.BytesIO(_csv(big))
    [record] = connectors.get("tenable_csv").parse(stream, ParseOptions())
    assert len(record.evidence) == 65536
    assert not stream.closed


# ---- products, observations, Tenable VM's dotted semicolon export -------------------------


@pytest.mark.parametrize(
    ("name", "product"),
    [
        ("nessus-template.csv", "Nessus"), ("nessus_many_vuln2-all.csv", "Nessus"),
        ("tenable_many_vuln.csv", "Tenable.io"), ("issue_11102.csv", "Tenable.sc"),
        ("issue_9612.csv", "Tenable.sc"), ("nessus_many_vuln.csv", "Tenable.sc"),
        ("tenable_vm_export.csv", "Tenable.io"),
    ],
)
def test_product_from_the_column_set(sample, name, product):
    assert {r.product for r in _records(sample(f"tenable_csv/{name}"))} == {product}


def test_product_unknown_when_the_columns_do_not_tell():
    header = [h for h in NESSUS_HEADER if h != "Risk"] + ["Severity"]
    [record] = parse_all("tenable_csv", _csv(ROW, header=header))
    assert record.product is None  # the connector's PRODUCT "Tenable" applies


def test_info_rows_are_observations():
    info = dict(ROW, **{"Plugin ID": "11219", "Risk": "None", "CVE": "", "CVSS": "", "Port": "443",
                        "Name": "Nessus SYN scanner", "Plugin Output": "Port 443/tcp was found to be open"})
    sc_info = {"Plugin": "19506", "Plugin Name": "Nessus Scan Information", "Family": "Settings",
               "Severity": "Info", "IP Address": "10.0.0.9", "Port": "0", "Protocol": "TCP"}
    [observation] = parse_all("tenable_csv", _csv(info))
    assert isinstance(observation, Observation)
    assert observation.provider_id == "192.168.0.100|11219|443/tcp"
    assert (observation.name, observation.category, observation.value) == (
        "Nessus SYN scanner", "port", "443/tcp")
    assert (observation.port, observation.protocol, observation.vendor_id) == (443, "tcp", "11219")
    assert observation.evidence == "Port 443/tcp was found to be open"
    header = ["Plugin", "Plugin Name", "Family", "Severity", "IP Address", "Port", "Protocol"]
    [sc] = parse_all("tenable_csv", _csv(sc_info, header=header))
    assert isinstance(sc, Observation) and sc.product == "Tenable.sc"
    assert (sc.name, sc.port, sc.protocol) == ("Nessus Scan Information", None, None)


def test_tenable_vm_dotted_semicolon_export(sample):
    data = sample("tenable_csv/tenable_vm_export.csv").read_bytes()
    assert connectors.detect(data[:65536]) == "tenable_csv"
    records = parse_all("tenable_csv", data)
    web_uuid, db_uuid = "6f1c0f86-3b55-4f0e-9a43-2d8e6f4b1c21", "0b5a1d8e-9f2c-4d3e-8a7b-6c5d4e3f2a1b"
    assert [(type(r).__name__, r.provider_id) for r in records] == [
        ("FindingRecord", f"{web_uuid}|42873|443/tcp"),
        ("Observation", f"{web_uuid}|19506|0/tcp"),
        ("FindingRecord", f"{web_uuid}|42873|8443/tcp"),
        ("Observation", f"{web_uuid}|11219|443/tcp"),
        # the same plugin on the same asset and port, rows apart: the same provider_id (the merge folds)
        ("FindingRecord", f"{web_uuid}|42873|443/tcp"),
        ("FindingRecord", f"{db_uuid}|156032|0/tcp"),
        ("FindingRecord", f"{db_uuid}|97833|445/tcp"),
    ]
    assert {r.product for r in records} == {"Tenable.io"}
    sweet32, info, _, syn, again, log4j, smb = records
    assert sweet32.title == "SSL Medium Strength Cipher Suites Supported (SWEET32)"
    assert sweet32.vendor_id == "42873"
    assert (sweet32.severity, sweet32.severity_original, sweet32.severity_scale) == (
        "high", "High", "tenable risk factor")
    assert (sweet32.cvss_score, sweet32.cvss_vector) == (7.5, "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N")
    assert sweet32.cves == ["CVE-2016-2183"]
    assert sweet32.status == "open"  # ACTIVE
    assert sweet32.first_seen == datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
    seen = datetime(2024, 5, 2, 8, 15, 30, 123000, tzinfo=UTC)
    assert sweet32.last_seen == sweet32.provider_timestamp == seen
    assert sweet32.remediation.startswith("Reconfigure the affected application")
    assert sweet32.description.startswith("The remote host supports the use of SSL ciphers")
    assert sweet32.evidence.endswith("DES-CBC3-SHA ; 0x00, 0x0A ; RSA")  # semicolons inside a quoted cell
    assert sweet32.extra == {"port": "443", "protocol": "tcp", "plugin_family": "General", "vpr_score": "5.1"}
    web = sweet32.resource
    assert (web.agent_id, web.host_key) == (web_uuid, web_uuid)
    assert (web.fqdn, web.hostname, web.name) == ("web-01.corp.example", "web-01", "web-01")
    assert (web.ipv4, web.mac, web.os) == (["10.20.0.11"], "00:50:56:a6:60:bc", "Ubuntu 22.04")
    assert web.network is None  # the all-zero default network is no scope
    assert again.status == "open" and again.last_seen == datetime(2024, 5, 3, 9, tzinfo=UTC)  # RESURFACED
    assert again.evidence.endswith("EDH-RSA-DES-CBC3-SHA ; 0x00, 0x16 ; DH")
    assert (info.name, info.category, info.port, info.evidence) == (
        "Nessus Scan Information", "other", None, "Nessus version : 10.7.2\nScan type : Normal")
    assert (syn.category, syn.value, syn.port, syn.protocol) == ("port", "443/tcp", 443, "tcp")
    assert log4j.status == "fixed" and log4j.severity == "critical"  # FIXED
    assert log4j.cves == ["CVE-2021-44228", "CVE-2021-45046"]
    assert (log4j.cvss_score, log4j.cvss_vector) == (10.0, "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H")
    db = log4j.resource
    assert (db.agent_id, db.host_key, db.hostname, db.fqdn) == (db_uuid, db_uuid, "db-02", None)
    assert db.network == "5f0a3c1e-7b2d-4c8e-9f1a-2b3c4d5e6f70"
    assert db.os == "Microsoft Windows Server 2019" and db.mac is None
    assert smb.status == "open" and smb.evidence is None  # NEW
    assert smb.cves == ["CVE-2017-0143", "CVE-2017-0144", "CVE-2017-0145"]


def test_same_plugin_asset_and_port_keep_one_provider_id_across_the_file():
    """Rows of one (host, plugin, port) apart from each other: equal ids, each with its output."""
    first = dict(ROW, **{"Plugin Output": "first install"})
    other = dict(ROW, **{"Plugin ID": "11213", "Name": "HTTP TRACE", "CVE": ""})
    second = dict(ROW, **{"Plugin Output": "second install"})
    records = parse_all("tenable_csv", _csv(first, other, second))
    assert [r.provider_id for r in records] == [
        "192.168.0.100|187315|22/tcp", "192.168.0.100|11213|22/tcp", "192.168.0.100|187315|22/tcp"]
    assert [records[0].evidence, records[2].evidence] == ["first install", "second install"]


def test_semicolon_header_is_sniffed_even_with_commas_in_cells():
    header = ["asset.id", "asset.display_ipv4_address", "definition.id", "definition.name", "severity",
              "state", "port", "protocol", "output"]
    row = {"asset.id": "11111111-2222-3333-4444-555555555555", "asset.display_ipv4_address": "10.1.1.1",
           "definition.id": "10863", "definition.name": "SSL Certificate Information", "severity": "Info",
           "state": "ACTIVE", "port": "443", "protocol": "TCP", "output": "a, b, c, d, e, f, g, h"}
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";")
    writer.writerow(header)
    writer.writerow([row[name] for name in header])
    [record] = parse_all("tenable_csv", out.getvalue().encode())
    assert isinstance(record, Observation)
    assert record.provider_id == "11111111-2222-3333-4444-555555555555|10863|443/tcp"
    assert record.evidence == "a, b, c, d, e, f, g, h"
