import io
import time
import tracemalloc
from datetime import UTC, datetime

import pytest

import connectors
from connectors._qualys import cvss, html_to_text, root_element
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Observation, Rejected
from tests.connectors.conftest import parse_all

PROLOG = (
    b'<?xml version="1.0" encoding="UTF-8" ?>\n'
    b'<!DOCTYPE HOST_LIST_VM_DETECTION_OUTPUT SYSTEM '
    b'"https://qualysapi.qualys.com/api/2.0/fo/asset/host/vm/detection/host_list_vm_detection_output.dtd">\n'
)


def _hld(*hosts: str) -> bytes:
    body = "".join(hosts)
    host_list = f"<HOST_LIST>{body}</HOST_LIST>" if hosts else ""
    return PROLOG + (
        "<HOST_LIST_VM_DETECTION_OUTPUT><RESPONSE><DATETIME>2024-05-01T10:00:00Z</DATETIME>"
        f"{host_list}</RESPONSE></HOST_LIST_VM_DETECTION_OUTPUT>"
    ).encode()


def _detection(qid: str | None = "38170", **fields: str) -> str:
    values = {"TYPE": "Confirmed", "SEVERITY": "3", "PORT": "443", "PROTOCOL": "tcp", "STATUS": "Active",
              "FIRST_FOUND_DATETIME": "2024-01-02T03:04:05Z", "LAST_FOUND_DATETIME": "2024-04-30T08:00:00Z",
              "LAST_UPDATE_DATETIME": "2024-04-30T09:00:00Z"}
    values.update(fields)
    inner = f"<QID>{qid}</QID>" if qid is not None else ""
    inner += "".join(f"<{name}>{value}</{name}>" for name, value in values.items() if value is not None)
    return f"<DETECTION>{inner}</DETECTION>"


HOST_FIELDS = "<ID>101</ID><IP>10.0.0.5</IP><DNS>web1.corp.example</DNS>"


def _host(*detections: str, host_fields: str = HOST_FIELDS) -> str:
    return f"<HOST>{host_fields}<DETECTION_LIST>{''.join(detections)}</DETECTION_LIST></HOST>"


# -- real sample -----------------------------------------------------------------------


def test_sample_detects_as_hld(sample):
    head = sample("qualys_hld_xml/jupiterone_detections.xml").read_bytes()[:65536]
    assert connectors.detect(head) == "qualys_hld"


def test_sample_detections_fields(sample):
    records = parse_all("qualys_hld", sample("qualys_hld_xml/jupiterone_detections.xml").read_bytes())
    assert [type(r) for r in records] == [FindingRecord] * 3
    assert [r.vendor_id for r in records] == ["38170", "38173", "38601"]
    assert [r.provider_id for r in records] == [
        "6506432|38170|3389/tcp", "6506432|38173|3389/tcp", "6506432|38601|3389/tcp"]
    first = records[0]
    assert first.title == "QID 38170"  # placeholder, enriched from the knowledge base later
    assert first.cves == []
    assert first.severity == "low"
    assert first.severity_original == "2"
    assert first.severity_scale == "qualys 1-5"
    assert first.status == "open"
    assert first.extra["qualys_status"] == "Active"
    assert first.extra["host_id"] == "6506432"
    assert first.extra["qualys_type"] == "Confirmed"
    assert first.first_seen == datetime(2018, 1, 26, 4, 45, 50, tzinfo=UTC)
    assert first.last_seen == datetime(2018, 4, 13, 3, 48, 50, tzinfo=UTC)
    assert first.provider_timestamp == datetime(2018, 4, 13, 3, 49, 5, tzinfo=UTC)
    # entities inside CDATA are unescaped
    assert first.evidence == "Certificate #0 CN=2k8r2-u-10-11(2k8r2-u-10-11) doesn'tresolve"
    assert records[1].evidence == "Certificate #0 CN=2k8r2-u-10-11\nunable to get local\nissuer certificate"
    resource = first.resource
    assert resource.hostname == "2k8r2-u-10-11"  # DNS without a dot
    assert resource.fqdn is None
    assert resource.netbios == "2K8R2-U-10-11"
    assert resource.ipv4 == ["10.10.10.11"]
    assert resource.os == "Windows 2008 R2 Enterprise Service Pack1"
    assert resource.agent_id is None
    assert resource.kind == "host"


# -- inline documents ------------------------------------------------------------------


def test_empty_document_yields_nothing():
    assert parse_all("qualys_hld", _hld()) == []
    assert parse_all("qualys_hld", _hld(_host())) == []


def test_one_detection_all_fields():
    host = _host(
        _detection("91541", SEVERITY="5", STATUS="Re-Opened", UNIQUE_VULN_ID="8812345",
                   RESULTS="<![CDATA[termsrv.dll 6.1.7601.17514]]>", SSL="0", QDS="95"),
        host_fields=(
            "<ID>202</ID><ASSET_ID>119586089</ASSET_ID><IP>10.1.2.3</IP><IPV6>FE80::1</IPV6>"
            "<OS>Windows Server 2019</OS><DNS>dc01</DNS>"
            "<DNS_DATA><HOSTNAME>dc01</HOSTNAME><DOMAIN>corp.example</DOMAIN><FQDN>dc01.corp.example</FQDN></DNS_DATA>"
            "<CLOUD_RESOURCE_ID>i-0abc123</CLOUD_RESOURCE_ID><NETBIOS>DC01</NETBIOS>"
            "<QG_HOSTID>2f1b9c2e-1111-2222-3333-444455556666</QG_HOSTID>"
        ),
    )
    [record] = parse_all("qualys_hld", _hld(host))
    assert record.provider_id == "8812345"  # UNIQUE_VULN_ID wins
    assert record.vendor_id == "91541"
    assert record.title == "QID 91541"
    assert record.severity == "critical"
    assert record.status == "open"
    assert record.extra["qualys_status"] == "Re-Opened"
    assert record.extra["unique_vuln_id"] == "8812345"
    assert record.extra["asset_id"] == "119586089"
    assert record.extra["ssl"] is False
    assert record.extra["qds"] == "95"
    assert record.evidence == "termsrv.dll 6.1.7601.17514"
    assert record.provider_timestamp == datetime(2024, 4, 30, 9, 0, tzinfo=UTC)
    resource = record.resource
    assert resource.agent_id == "qualys-asset:119586089"
    assert resource.cloud_id is None  # an instance id is not a cloud resource id (an ARN elsewhere)
    assert resource.instance_id == "i-0abc123"
    assert resource.host_key == "202"  # the host ID: provenance, never identity
    assert resource.hostname == "dc01"
    assert resource.fqdn == "dc01.corp.example"
    assert resource.netbios == "DC01"
    assert resource.ipv4 == ["10.1.2.3"]
    assert resource.ipv6 == ["fe80::1"]


def test_fixed_status_fqdn_dns_and_timestamp_fallbacks():
    host = _host(
        _detection("38739", STATUS="Fixed", LAST_UPDATE_DATETIME=None,
                   LAST_FIXED_DATETIME="2024-04-29T07:00:00Z"),
        _detection("38740", STATUS="New", PORT=None, PROTOCOL=None, LAST_UPDATE_DATETIME=None,
                   LAST_PROCESSED_DATETIME="2024-04-28T07:00:00Z"),
        _detection("45038", TYPE="Info", SEVERITY="3", STATUS=None, FQDN="www.corp.example"),
        host_fields="<ID>303</ID><IP>10.9.9.9</IP><DNS>web1.corp.example</DNS><QG_HOSTID>abc-uuid</QG_HOSTID>",
    )
    fixed, new, info = parse_all("qualys_hld", _hld(host))
    assert fixed.status == "fixed" and fixed.extra["qualys_status"] == "Fixed"
    assert fixed.provider_timestamp == datetime(2024, 4, 29, 7, 0, tzinfo=UTC)
    assert fixed.resource.fqdn == "web1.corp.example" and fixed.resource.hostname is None
    assert fixed.resource.agent_id == "abc-uuid"
    assert new.status == "open"
    assert new.provider_id == "303|38740|/"
    assert new.provider_timestamp == datetime(2024, 4, 28, 7, 0, tzinfo=UTC)
    # information gathered is an Observation whatever its level
    assert isinstance(info, Observation)
    assert (info.name, info.vendor_id, info.category) == ("QID 45038", "45038", "other")
    assert (info.port, info.protocol) == (443, "tcp")
    assert info.provider_id == "303|45038|443/tcp|www.corp.example"


def test_detection_without_qid_is_rejected_and_others_kept():
    host = _host(_detection("1001"), _detection(None), _detection("1003"))
    records = parse_all("qualys_hld", _hld(host, _host(_detection("2001"))))
    assert [type(r) for r in records] == [FindingRecord, Rejected, FindingRecord, FindingRecord]
    rejected = records[1]
    assert rejected.position == "HOST[1]/DETECTION[2]"
    assert "QID" in rejected.reason
    assert [r.vendor_id for r in records if isinstance(r, FindingRecord)] == ["1001", "1003", "2001"]


def test_bad_severity_status_date_and_host_are_rejected():
    records = parse_all("qualys_hld", _hld(
        _host(_detection("1", SEVERITY="9"), _detection("2", STATUS="Ignored"),
              _detection("3", FIRST_FOUND_DATETIME="yesterday")),
        _host(_detection("4"), host_fields="<ID>404</ID><TRACKING_METHOD>IP</TRACKING_METHOD>"),
    ))
    assert all(isinstance(r, Rejected) for r in records)
    assert [r.position for r in records] == [
        "HOST[1]/DETECTION[1]", "HOST[1]/DETECTION[2]", "HOST[1]/DETECTION[3]", "HOST[2]/DETECTION[1]"]
    assert "SEVERITY" in records[0].reason
    assert "STATUS" in records[1].reason
    assert "FIRST_FOUND_DATETIME" in records[2].reason
    assert "identifier" in records[3].reason
    assert records[0].provider_id == "101|1|443/tcp"


# -- refusing other and hostile input ----------------------------------------------------


def test_nessus_file_is_a_format_error_naming_the_root(sample):
    data = sample("nessus_v2_xml/nessus_many_vuln.xml").read_bytes()
    assert not connectors.get("qualys_hld").sniff(data[:65536])
    with pytest.raises(FormatError) as error:
        parse_all("qualys_hld", data)
    assert "NessusClientData_v2" in str(error.value)
    assert "HOST_LIST_VM_DETECTION_OUTPUT" in str(error.value)


def test_knowledge_base_pushed_as_hld_is_a_format_error(sample):
    data = sample("qualys_hld_xml/jupiterone_knowledge_base_vuln_list_response.xml").read_bytes()
    with pytest.raises(FormatError, match="KNOWLEDGE_BASE_VULN_LIST_OUTPUT"):
        parse_all("qualys_hld", data)


@pytest.mark.parametrize(
    "body", [b"", b"IP,QID\n10.0.0.1,38170\n", b'{"findings": []}', b"\x00\x01\x02garbage"])
def test_non_xml_body_is_a_format_error(body):
    with pytest.raises(FormatError):
        parse_all("qualys_hld", body)


def test_truncated_document_is_a_format_error():
    data = _hld(_host(_detection("1"), _detection("2")))
    with pytest.raises(FormatError, match="well-formed"):
        parse_all("qualys_hld", data[:-60])


def test_billion_laughs_is_refused():
    body = (
        b'<?xml version="1.0"?>\n<!DOCTYPE HOST_LIST_VM_DETECTION_OUTPUT [\n'
        b'<!ENTITY lol "lol">\n'
        + b"".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
            for i in range(1, 10)
        )
        + b"]>\n<HOST_LIST_VM_DETECTION_OUTPUT><RESPONSE><HOST_LIST><HOST><ID>1</ID><IP>10.0.0.1</IP>"
        b"<DETECTION_LIST><DETECTION><QID>1</QID><SEVERITY>3</SEVERITY><RESULTS>&lol9;</RESULTS>"
        b"</DETECTION></DETECTION_LIST></HOST></HOST_LIST></RESPONSE></HOST_LIST_VM_DETECTION_OUTPUT>"
    )
    with pytest.raises(FormatError, match="entity"):
        parse_all("qualys_hld", body)


def test_xxe_is_refused():
    body = (
        b'<?xml version="1.0"?>\n'
        b'<!DOCTYPE HOST_LIST_VM_DETECTION_OUTPUT [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        b"<HOST_LIST_VM_DETECTION_OUTPUT><RESPONSE><HOST_LIST><HOST><ID>1</ID><IP>10.0.0.1</IP>"
        b"<DETECTION_LIST><DETECTION><QID>1</QID><SEVERITY>3</SEVERITY><RESULTS>&xxe;</RESULTS>"
        b"</DETECTION></DETECTION_LIST></HOST></HOST_LIST></RESPONSE></HOST_LIST_VM_DETECTION_OUTPUT>"
    )
    with pytest.raises(FormatError, match="entity"):
        parse_all("qualys_hld", body)


def test_qualys_api_error_response_is_quoted():
    body = (
        b'<?xml version="1.0" encoding="UTF-8" ?>\n<!DOCTYPE SIMPLE_RETURN SYSTEM '
        b'"https://qualysapi.qualys.com/api/2.0/simple_return.dtd">\n<SIMPLE_RETURN><RESPONSE>'
        b"<DATETIME>2024-05-01T10:00:00Z</DATETIME><CODE>1965</CODE>"
        b"<TEXT>This API cannot be run again for another 23 hours</TEXT></RESPONSE></SIMPLE_RETURN>"
    )
    with pytest.raises(FormatError, match="1965.*23 hours"):
        parse_all("qualys_hld", body)


def test_sniff_looks_at_the_root_element_only():
    head = PROLOG + b"<!-- c --><HOST_LIST_VM_DETECTION_OUTPUT>"
    assert root_element(head) == "HOST_LIST_VM_DETECTION_OUTPUT"
    assert not connectors.get("qualys_hld").sniff(b"<SCAN><HOST_LIST_VM_DETECTION_OUTPUT/></SCAN>")
    assert not connectors.get("qualys_hld").sniff(PROLOG)  # the DOCTYPE alone is no root element


def test_shared_text_helpers():
    text = ('Upgrade <A HREF="https://x.example/dl" TARGET="_blank">here</A>.'
            "<P>Then&nbsp;reboot &amp; check  a &lt; b.")
    assert html_to_text(text) == "Upgrade here (https://x.example/dl).\nThen reboot & check a < b."
    assert html_to_text("versions < 2.4 and <2.5") == "versions < 2.4 and <2.5"
    assert html_to_text("  ") is None
    assert cvss("9.0 (AV:N/AC:H/PR:N/UI:N/S:C/C:H/I:H/A:H)") == (9.0, "AV:N/AC:H/PR:N/UI:N/S:C/C:H/I:H/A:H")
    assert cvss("5") == (5.0, None)
    assert cvss("-") == (None, None)
    assert cvss("'-") == (None, None)


# -- streaming -------------------------------------------------------------------------


def _write_synthetic_hld(path, target_bytes: int) -> int:
    """Write an HLD document of about target_bytes; return its number of detections."""
    detections = 0
    result = "Certificate #0 CN=host unable to get local issuer certificate " * 6
    with open(path, "wb") as out:
        out.write(PROLOG + b"<HOST_LIST_VM_DETECTION_OUTPUT><RESPONSE><DATETIME>2024-05-01T10:00:00Z"
                  b"</DATETIME><HOST_LIST>")
        host = 0
        while out.tell() < target_bytes:
            host += 1
            parts = [f"<HOST><ID>{host}</ID><IP>10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}</IP>"
                     f"<TRACKING_METHOD>IP</TRACKING_METHOD><OS><![CDATA[Linux 5.{host % 20}]]></OS>"
                     f"<DNS><![CDATA[host{host}.corp.example]]></DNS><DETECTION_LIST>"]
            for n in range(10):
                detections += 1
                parts.append(
                    f"<DETECTION><QID>{38000 + n}</QID><TYPE>Confirmed</TYPE><SEVERITY>{1 + n % 5}</SEVERITY>"
                    f"<PORT>443</PORT><PROTOCOL>tcp</PROTOCOL><SSL>1</SSL><RESULTS><![CDATA[{result}]]></RESULTS>"
                    f"<STATUS>Active</STATUS><FIRST_FOUND_DATETIME>2024-01-26T04:45:50Z</FIRST_FOUND_DATETIME>"
                    f"<LAST_FOUND_DATETIME>2024-04-13T03:48:50Z</LAST_FOUND_DATETIME><TIMES_FOUND>11</TIMES_FOUND>"
                    f"<LAST_UPDATE_DATETIME>2024-04-13T03:49:05Z</LAST_UPDATE_DATETIME></DETECTION>"
                )
            parts.append("</DETECTION_LIST></HOST>")
            out.write("".join(parts).encode())
        out.write(b"</HOST_LIST></RESPONSE></HOST_LIST_VM_DETECTION_OUTPUT>\n")
    return detections


def test_streaming_memory_stays_flat(tmp_path):
    path = tmp_path / "big_hld.xml"
    expected = _write_synthetic_hld(path, 20 * 1024 * 1024)
    assert path.stat().st_size >= 20 * 1024 * 1024
    connector = connectors.get("qualys_hld")
    count = 0
    last = None
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with open(path, "rb") as stream:
            for record in connector.parse(stream, ParseOptions(provider="Qualys")):
                count += 1
                last = record
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == expected
    assert isinstance(last, FindingRecord) and last.vendor_id == "38009"
    assert peak < 20 * 1024 * 1024, f"peak Python memory {peak / 2**20:.1f} MiB"
    print(f"\nqualys_hld: {count} records from {path.stat().st_size / 2**20:.1f} MiB in {elapsed:.2f}s "
          f"under tracemalloc = {count / elapsed:,.0f} records/s, peak {peak / 2**20:.2f} MiB")


def test_stream_is_read_incrementally():
    """The first record comes out before the whole stream has been read."""
    data = _hld(*(_host(_detection(str(n)), host_fields=f"<ID>{n}</ID><IP>10.0.0.{n % 250 + 1}</IP>")
                  for n in range(1, 3000)))
    stream = io.BytesIO(data)
    records = connectors.get("qualys_hld").parse(stream, ParseOptions())
    first = next(records)
    assert first.vendor_id == "1"
    assert stream.tell() < len(data)
    records.close()


def test_cloud_agent_host_identity_and_information_gathered(sample):
    records = parse_all("qualys_hld", sample("qualys_hld_xml/cloud_agent_identity.xml").read_bytes())
    os_fact, port_fact, finding = records
    assert [type(r) for r in records] == [Observation, Observation, FindingRecord]
    resource = finding.resource
    assert resource == os_fact.resource == port_fact.resource
    assert resource.agent_id == "qualys-asset:38164291"  # ASSET_ID first, as before
    assert resource.host_key == "143597851"  # host ID: provenance only
    assert resource.instance_id == "i-0f1e2d3c4b5a69788"  # EC2_INSTANCE_ID
    assert resource.cloud_id is None
    assert resource.network == "1208"  # NETWORK_ID
    assert resource.fqdn == "ip-172-31-20-15.eu-west-1.compute.internal"
    assert (resource.netbios, resource.os) == ("IP-172-31-20-15", "Amazon Linux 2")
    assert resource.ipv4 == ["172.31.20.15"]
    assert finding.extra["qg_host_id"] == "4c1e7b3a-5f62-4d8e-9a0b-1c2d3e4f5a6b"
    assert (os_fact.provider_id, os_fact.name, os_fact.category) == ("9188772211", "QID 45017", "os")
    assert os_fact.evidence == "Operating System\tTechnique\tID\nAmazon Linux 2\tCloud Agent"
    assert os_fact.last_seen == datetime(2024, 5, 1, 22, 9, 41, tzinfo=UTC)
    assert (port_fact.category, port_fact.value) == ("port", "22/tcp")
    assert (port_fact.port, port_fact.protocol) == (22, "tcp")
    assert (finding.provider_id, finding.severity, finding.status) == ("9188772290", "high", "open")


def test_default_network_and_agent_only_host():
    host = _host(_detection("1001"), host_fields=(
        "<ID>404</ID><IP>10.0.0.9</IP><NETWORK_ID>0</NETWORK_ID><QG_HOSTID>abc-uuid</QG_HOSTID>"))
    [record] = parse_all("qualys_hld", _hld(host))
    resource = record.resource
    assert (resource.network, resource.agent_id, resource.host_key) == (None, "abc-uuid", "404")
