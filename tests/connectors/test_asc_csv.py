import io
from datetime import UTC, datetime

import pytest

import connectors
from connectors import asc_csv
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

SUB = "/subscriptions/9cfbad7a-7369-42e4-bcce-7677c5b3a44b"
VNET = f"{SUB}/resourcegroups/my_resource_group/providers/microsoft.network/virtualnetworks/" \
       "my_virtual_network"
STORAGE = f"{SUB}/resourcegroups/cloud-shell-storage-westeurope/providers/microsoft.storage/" \
          "storageaccounts/swe10032201245e263h"


def _lines(sample):
    return sample("azure_security_center_csv/many_vulns.csv").read_bytes().split(b"\n")


def test_header_only_export_yields_nothing(sample):
    assert parse_all("asc_csv", sample("azure_security_center_csv/zero_vulns.csv").read_bytes()) == []


def test_one_unhealthy_row(sample):
    header, first = _lines(sample)[:2]
    [record] = parse_all("asc_csv", header + b"\n" + first + b"\n")
    assert isinstance(record, FindingRecord)
    assert record.provider_id == f"{VNET}|f67fb4ed-d481-44d7-91e5-efadf504f74a"
    assert record.title == "Virtual networks should be protected by Azure Firewall"
    assert (record.severity, record.severity_original) == ("low", "Low")
    assert (record.kind, record.status) == ("compliance", "open")
    assert record.recommendation == record.vendor_id == "f67fb4ed-d481-44d7-91e5-efadf504f74a"
    assert record.resource.cloud_id == VNET
    assert (record.resource.name, record.resource.kind) == ("my_virtual_network", "cloud_resource")
    assert record.description.startswith("Some of your virtual networks aren't protected")
    assert record.remediation.startswith("To protect your virtual networks with Azure Firewall")
    assert record.first_seen == datetime(2021, 9, 28, 15, 7, 10, 398840, tzinfo=UTC)
    assert record.last_seen == datetime(2021, 9, 28, 16, 1, 10, 373000, tzinfo=UTC)  # exportedTimestamp
    assert record.provider_timestamp == datetime(2021, 9, 28, 15, 7, 10, 398840, tzinfo=UTC)
    assert record.references[0].startswith("https://portal.azure.com/#blade/Microsoft_Azure_Security/")
    assert record.extra["controls"] == {
        "Restrict unauthorized network access": "f9d5432b-8f7b-45e9-b90c-e214a30f6a02"}
    assert record.extra["subscriptionName"] == "My first subscription"
    assert record.extra["assessmentId"] == f"{VNET}/providers/Microsoft.Security/assessments/" \
                                           "f67fb4ed-d481-44d7-91e5-efadf504f74a"
    assert record.cves == []


def test_many_rows(sample):
    records = parse_all("asc_csv", sample("azure_security_center_csv/many_vulns.csv").read_bytes())
    assert [r.title for r in records] == [
        "Virtual networks should be protected by Azure Firewall",
        "Network Watcher should be enabled",
        "Azure Defender for Resource Manager should be enabled",
        "Storage account should use a private link connection",
    ]
    assert [r.status for r in records] == ["open", "fixed", "open", "open"]
    assert [r.severity for r in records] == ["low", "low", "high", "medium"]
    assert [r.resource.cloud_id for r in records] == [VNET, VNET, SUB, STORAGE]
    assert records[2].extra["nativeCloudAccountId"] == "my_native_cloud_id"
    assert "resourceGroup" not in records[2].extra  # empty cell
    assert records[3].provider_id == f"{STORAGE}|cdc78c07-02b0-4af0-1cb2-cb7c672a8b0a"


def test_not_applicable_row_is_fixed_with_reason(sample):
    header, first = _lines(sample)[:2]
    row = first.replace(b'"Low","Unhealthy","",', b'"Low","NotApplicable","OffByPolicy",')
    [record] = parse_all("asc_csv", header + b"\n" + row + b"\n")
    assert record.status == "fixed"
    assert record.extra["notApplicable"] is True
    assert record.extra["notApplicableReason"] == "OffByPolicy"


def test_bad_rows_rejected_with_line_numbers(sample):
    header, first, second, third, fourth = _lines(sample)[:5]
    bad_severity = second.replace(b'"Low","Healthy"', b'"Severe","Healthy"')
    short = b'"2021-09-28T16:01:10.373Z","9cfbad7a","My first subscription"'
    bad_time = third.replace(b'"2021-09-28T15:07:23.1184513Z"', b'"last tuesday"', 1)
    multiline = fourth.replace(b"Private links enforce", b"Private links\nenforce")
    body = b"\r\n".join([header, first, bad_severity, short, bad_time, multiline, first]) + b"\r\n"
    records = parse_all("asc_csv", body)
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "Rejected",
                                                   "FindingRecord", "FindingRecord"]
    assert records[1] == Rejected(position="line 3", reason=records[1].reason,
                                  provider_id=f"{VNET}|f1f2f7dc-7bd5-18bf-c403-cbbdb7ec3d68")
    assert "Severe" in records[1].reason
    assert records[2].position == "line 4" and "3 fields, the header 20" in records[2].reason
    assert records[3].position == "line 5" and "firstEvaluationDate" in records[3].reason
    assert records[4].description.startswith("Private links\nenforce")
    assert records[5].provider_id == records[0].provider_id  # the multi-line row took lines 6-7


def test_header_without_the_columns_is_a_format_error():
    with pytest.raises(FormatError, match="lacks resourceId, recommendationName"):
        parse_all("asc_csv", b"Plugin,Plugin Name,Severity,state\n1,x,High,Open\n")


@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty"),
    (b"\xef\xbb\xbf\"resourceId\",\"recommendationName\"\n\xff\xfe\n", "not UTF-8"),
])
def test_empty_or_undecodable_is_a_format_error(body, message):
    with pytest.raises(FormatError, match=message):
        parse_all("asc_csv", body)


def test_truncated_inside_a_quoted_field_is_a_format_error(sample):
    data = sample("azure_security_center_csv/many_vulns.csv").read_bytes()
    cut = data.index(b"Network Watcher is a regional service")
    with pytest.raises(FormatError, match="not well-formed CSV at line 3"):
        parse_all("asc_csv", data[:cut + 20])


def test_does_not_close_the_stream(sample):
    stream = io.BytesIO(sample("azure_security_center_csv/many_vulns.csv").read_bytes())
    assert len(list(asc_csv.parse(stream, ParseOptions()))) == 4
    assert not stream.closed


@pytest.mark.parametrize("name", ["many_vulns.csv", "zero_vulns.csv"])
def test_detect(sample, name):
    assert connectors.detect(sample(f"azure_security_center_csv/{name}").read_bytes()[:65536]) == "asc_csv"


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "azure_security_center_csv"]
    assert [p.name for p in others if asc_csv.sniff(p.read_bytes()[:65536])] == []
