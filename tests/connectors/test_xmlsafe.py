"""The XML prolog check (connectors/xmlsafe.py): no internal DTD subset, whatever hides it.

The check must find where the prolog ends the way an XML parser does; a ``]`` or a ``<root``
inside a comment, a processing instruction or a quoted string of the DOCTYPE must not
fool it, nor an encoding it does not read (UTF-16, UTF-32, EBCDIC, UTF-7).
"""

from __future__ import annotations

import base64
import io

import pytest

from connectors import xmlsafe
from connectors.model import FormatError
from tests.connectors.conftest import SAMPLES, parse_all

ROOT = "NessusClientData_v2"
BODY = (f'<{ROOT}><Report name="t"><ReportHost name="10.0.0.1"><HostProperties/>'
        '<ReportItem port="443" svc_name="www" protocol="tcp" pluginID="1" pluginName="p" severity="3">'
        f"<plugin_output>&e;</plugin_output></ReportItem></ReportHost></Report></{ROOT}>")


def _doc(subset: str, *, decl: str = '<?xml version="1.0"?>\n') -> str:
    return f"{decl}<!DOCTYPE {ROOT} [{subset}]>\n{BODY}"


# Internal subsets that hide their declarations from a check that looks for the first
# "]" and then the first "<name" (the attack run's bypass and its variants).
HIDDEN = {
    "comment": f'<!-- ] <{ROOT} --><!ENTITY e "x">',
    "comment_then_system_entity": f'<!-- ]><{ROOT}> --><!ENTITY e SYSTEM "file:///etc/passwd">',
    "processing_instruction": f'<?pi ] <{ROOT} ?><!ENTITY e "x">',
    "quoted_entity_value": f'<!ENTITY d "]><{ROOT}>"><!ENTITY e "x">',
    "quoted_attribute_default": f'<!ATTLIST {ROOT} a CDATA "]<{ROOT}>"><!ENTITY e "x">',
    "parameter_entity": f'<!-- ] <{ROOT} --><!ENTITY % p "<!ENTITY e \'x\'>"> %p;',
    "external_parameter_entity": f'<!-- ] <{ROOT} --><!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;',
    "lower_case_entity": f'<!-- ] <{ROOT} --><!entity e "x">',
}

# Internal subsets with nothing hidden: refused all the same (no real export has one).
PLAIN = {
    "entity": '<!ENTITY e "x">',
    "element_only": f"<!ELEMENT {ROOT} ANY>",
    "attribute_default": f'<!ATTLIST {ROOT} injected CDATA "yes">',
    "comment_only": "<!-- nothing -->",
    "billion_laughs": '<!ENTITY a "aaaaaaaaaa"><!ENTITY e "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">',
}


@pytest.mark.parametrize("subset", list(HIDDEN.values()) + list(PLAIN.values()),
                         ids=[f"hidden_{k}" for k in HIDDEN] + [f"plain_{k}" for k in PLAIN])
def test_a_non_empty_internal_subset_is_refused(subset):
    data = _doc(subset).encode()
    with pytest.raises(FormatError, match="internal DTD subset"):
        xmlsafe.read_prolog(io.BytesIO(data))
    with pytest.raises(FormatError, match="entity"):  # the connectors' own wording
        parse_all("nessus", data)


@pytest.mark.parametrize("subset", ["", " ", "\n\t "])
def test_an_empty_internal_subset_is_accepted(subset):
    [record] = parse_all("nessus", _doc(subset).replace("&e;", "x").encode())
    assert record.evidence == "x"


@pytest.mark.parametrize("doctype", [
    f'<!DOCTYPE {ROOT} SYSTEM "https://example.com/a[1].dtd">',
    f"<!DOCTYPE {ROOT} SYSTEM 'https://example.com/]>x.dtd'>",
    f'<!DOCTYPE {ROOT} PUBLIC "-//X//DTD X//EN" "x[1]>.dtd">',
    f"<!DOCTYPE {ROOT}>",
    f"<!DOCTYPE\n{ROOT}\nSYSTEM\n'x.dtd'\n>",
])
def test_brackets_in_the_external_id_are_not_a_subset(doctype):
    data = f'<?xml version="1.0"?>\n<!-- [ --><?pi [ ?>{doctype}<!-- ] -->\n{BODY}'.replace("&e;", "x")
    assert xmlsafe.root_tag(io.BytesIO(data.encode()))[0] == ROOT
    [record] = parse_all("nessus", data.encode())
    assert record.evidence == "x"


@pytest.mark.parametrize("prolog", [
    f'<!DOCTYPE {ROOT} SYSTEM "x]y.dtd" [<!ENTITY e "z">]>',
    f"<!DOCTYPE {ROOT} SYSTEM 'x\"]>\"y.dtd' [<!ENTITY e 'z'>]>",
    f'<!DOCTYPE {ROOT} SYSTEM "x.dtd"><!-- ] --><!DOCTYPE {ROOT} [<!ENTITY e "z">]>',  # a second DOCTYPE
])
def test_a_subset_after_quoted_brackets_or_a_first_doctype_is_refused(prolog):
    data = f'<?xml version="1.0"?>{prolog}{BODY}'.encode()
    with pytest.raises(FormatError, match="internal DTD subset"):
        xmlsafe.read_prolog(io.BytesIO(data))


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("subset", [HIDDEN["comment"], ""], ids=["bypass", "benign"])
def test_utf16_and_utf32_documents_are_refused(codec, subset):
    """The check reads bytes as ASCII; a parser that decodes UTF-16 would see what it cannot."""
    text = _doc(subset, decl=f'<?xml version="1.0" encoding="{codec.split("-le")[0].split("-be")[0]}"?>\n')
    with pytest.raises(FormatError, match="UTF-16, UTF-32 or EBCDIC"):
        xmlsafe.read_prolog(io.BytesIO(text.encode(codec)))
    with pytest.raises(FormatError, match="UTF-16, UTF-32 or EBCDIC"):
        parse_all("nessus", text.encode(codec))


def test_ebcdic_documents_are_refused():
    data = _doc(HIDDEN["comment"], decl='<?xml version="1.0" encoding="IBM500"?>').encode("cp500")
    with pytest.raises(FormatError, match="UTF-16, UTF-32 or EBCDIC"):
        xmlsafe.read_prolog(io.BytesIO(data))


def _utf7(text: str) -> bytes:
    """UTF-7 with every character but letters and digits base64-encoded ('<' is '+ADw-')."""
    return "".join(
        ch if ch.isascii() and ch.isalnum()
        else "+" + base64.b64encode(ch.encode("utf-16-be")).decode().rstrip("=") + "-"
        for ch in text).encode("ascii")


@pytest.mark.parametrize("encoding", ["UTF-7", "UTF-16", "IBM037", "Shift_JIS", "x-unknown"])
def test_a_declared_encoding_the_check_cannot_read_is_refused(encoding):
    """UTF-7 writes '<' as '+ADw-': a byte-level check would see no DOCTYPE at all."""
    decl = f'<?xml version="1.0" encoding="{encoding}"?>'
    hidden = f'<!DOCTYPE {ROOT} [<!ENTITY e "x">]>{BODY}'
    data = decl.encode() + _utf7(hidden)
    assert data.decode("utf-7").endswith(hidden) and b"<" not in data[len(decl):]
    with pytest.raises(FormatError, match=f"encoding '{encoding}' is not supported"):
        xmlsafe.read_prolog(io.BytesIO(data))


@pytest.mark.parametrize("encoding",
                         ["UTF-8", "utf-8", "US-ASCII", "ISO-8859-1", "iso-8859-15", "windows-1252"])
def test_ascii_compatible_encodings_are_read(encoding):
    data = f'<?xml version="1.0" encoding="{encoding}"?>\n{BODY}'.replace("&e;", "x").encode("ascii")
    [record] = parse_all("nessus", data)
    assert record.evidence == "x"


def test_a_subset_hidden_beyond_the_first_read_is_refused():
    """Prologs are read in 64 KiB pieces: a DOCTYPE across a boundary is still seen whole."""
    for pad in (65536 - 40, 65536 - 12, 65536 - 3, 65536, 65536 + 7):
        filler = f"<!--{'x' * pad}-->"
        hostile = f'<?xml version="1.0"?>{filler}<!DOCTYPE {ROOT} [<!-- ] <{ROOT} --><!ENTITY e "x">]>{BODY}'
        with pytest.raises(FormatError, match="internal DTD subset"):
            xmlsafe.read_prolog(io.BytesIO(hostile.encode()))
        benign = f'<?xml version="1.0"?>{filler}<!DOCTYPE {ROOT} SYSTEM "x.dtd">{BODY}'.replace("&e;", "x")
        tag, stream = xmlsafe.root_tag(io.BytesIO(benign.encode()))
        assert tag == ROOT and stream.read() == benign.encode()


def test_short_reads_are_read_on():
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            chunk, self.data = self.data[:7], self.data[7:]
            return chunk

    hostile = _doc(HIDDEN["comment"]).encode()
    with pytest.raises(FormatError, match="internal DTD subset"):
        xmlsafe.read_prolog(Trickle(hostile))
    benign = f'<?xml version="1.0"?><!-- a comment --><!DOCTYPE {ROOT} SYSTEM "x.dtd">{BODY}'.encode()
    assert xmlsafe.root_tag(Trickle(benign))[0] == ROOT


def test_a_prolog_larger_than_1_mib_is_refused():
    data = b'<?xml version="1.0"?><!--' + b"x" * (1 << 20) + b"-->" + BODY.encode()
    with pytest.raises(FormatError, match="larger than 1 MiB"):
        xmlsafe.read_prolog(io.BytesIO(data))


@pytest.mark.parametrize("data", [b"", b"   ", b"just text", b'{"findings": []}', b"<!-- only a comment -->",
                                  b"<?xml version='1.0'?>"])
def test_no_root_element_is_not_an_xml_document(data):
    with pytest.raises(FormatError, match="not an XML document"):
        xmlsafe.root_tag(io.BytesIO(data))


XML_SAMPLES = sorted(p for p in SAMPLES.rglob("*") if p.is_file() and p.suffix in (".xml", ".nessus"))


@pytest.mark.parametrize("path", XML_SAMPLES, ids=lambda p: str(p.relative_to(SAMPLES)))
def test_every_xml_sample_passes_the_check(path):
    data = path.read_bytes()
    head, stream = xmlsafe.read_prolog(io.BytesIO(data))
    assert stream.read() == data
    tag, _ = xmlsafe.root_tag(io.BytesIO(data))
    assert tag and data.find(f"<{tag}".encode()) >= 0
