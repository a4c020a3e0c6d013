"""imageshare.xds.safexml: hostile XML is refused cleanly, ordinary XML parses."""

from __future__ import annotations

import pytest

from imageshare.xds.safexml import UnsafeXml, parse


def _refused(data: bytes, **limits: int) -> str:
    with pytest.raises(UnsafeXml) as info:
        parse(data, **limits)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_plain_document_parses() -> None:
    """A UTF-8 document with declaration, comment and namespaces parses to its root."""
    root = parse('<?xml version="1.0" encoding="UTF-8"?><!-- hi --><a xmlns="urn:x"><b>é</b></a>'.encode())
    assert root.tag == "{urn:x}a"
    assert root[0].text == "é"


def test_xxe_file_entity_refused(tmp_path) -> None:
    """An external entity naming a local file is refused, and the file is never read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    data = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]><a>&x;</a>'.encode()
    with pytest.raises(UnsafeXml) as info:
        parse(data)
    assert info.value.reason == "doctype"
    assert "TOPSECRET" not in str(info.value)


def test_xxe_network_entity_refused() -> None:
    """An external entity on the network (and a parameter entity) is refused."""
    assert _refused(b'<!DOCTYPE a [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]><a>&x;</a>') == "doctype"
    assert _refused(b'<!DOCTYPE a [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]><a/>') == "doctype"


def test_billion_laughs_refused() -> None:
    """Nested internal entities (exponential expansion) are refused without expansion."""
    entities = '<!ENTITY l0 "lol">' + "".join(
        f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10)
    )
    assert _refused(f"<?xml version='1.0'?><!DOCTYPE a [{entities}]><a>&l9;</a>".encode()) == "doctype"


def test_external_dtd_refused() -> None:
    """A DOCTYPE with an external DTD (and one hidden after a comment) is refused."""
    assert _refused(b'<!DOCTYPE a SYSTEM "http://127.0.0.1:9/a.dtd"><a/>') == "doctype"
    assert _refused(b'<?xml version="1.0"?>\n<!-- x -->\n<!doctype a SYSTEM "a.dtd"><a/>') == "doctype"


def test_undefined_entity_is_malformed() -> None:
    """An entity reference without a DTD is a clean malformed-XML refusal."""
    assert _refused(b"<a>&x;</a>") == "malformed"


def test_oversized_refused() -> None:
    """Input longer than max_bytes is refused before parsing."""
    assert _refused(b"<a>" + b"x" * 100 + b"</a>", max_bytes=50) == "too-large"


@pytest.mark.parametrize(
    "data",
    [b"", b"<a>", b"<a></b>", b"not xml", b"<a/><b/>", b"<a x='1' x='2'/>", b"\x00\x01"],
)
def test_malformed_refused(data: bytes) -> None:
    """Malformed input gives UnsafeXml, never an lxml exception."""
    with pytest.raises(UnsafeXml):
        parse(data)


@pytest.mark.parametrize(
    "data",
    [
        b'<?xml version="1.0" encoding="ISO-8859-1"?><a>\xe9</a>',
        b'<?xml version="1.0" encoding="UTF-16"?><a/>',
        '<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"),
        b"\xff\xfe<\x00a\x00/\x00>\x00",
        b"<a>\xe9</a>",
    ],
)
def test_non_utf8_refused(data: bytes) -> None:
    """Declared or actual encodings other than UTF-8 are refused as 'encoding'."""
    assert _refused(data) == "encoding"


def test_utf8_bom_and_ascii_declaration_accepted() -> None:
    """A UTF-8 byte order mark and a US-ASCII declaration are fine."""
    assert parse(b"\xef\xbb\xbf<a/>").tag == "a"
    assert parse(b'<?xml version="1.0" encoding="us-ascii"?><a/>').tag == "a"


def test_depth_limit() -> None:
    """Nesting beyond max_depth is refused while parsing."""
    deep = b"<a>" * 30 + b"</a>" * 30
    assert parse(deep, max_depth=30).tag == "a"
    assert _refused(deep, max_depth=29) == "too-deep"
    # libxml2's own nesting limit (huge_tree=False) may fire first, within one fed chunk.
    assert _refused(b"<a>" * 5000 + b"</a>" * 5000) in ("too-deep", "malformed")


def test_element_count_limit() -> None:
    """More than max_elements elements is refused."""
    wide = b"<a>" + b"<b/>" * 100 + b"</a>"
    assert len(parse(wide, max_elements=101)) == 100
    assert _refused(wide, max_elements=100) == "too-many-elements"


def test_not_bytes() -> None:
    """Text instead of bytes is a programming error (TypeError)."""
    with pytest.raises(TypeError):
        parse("<a/>")  # type: ignore[arg-type]
