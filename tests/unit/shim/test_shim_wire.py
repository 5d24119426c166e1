"""shim.wire's protobuf reader: every bound checked, because the bytes come from containerd (runtime
options on `start`'s stdin, the namespace list `kybernate ps` decodes by hand). Bad input is a
WireError naming what is wrong, never an IndexError or a field cut short."""
import pytest
from hypothesis import given, strategies as st

from kybernate import OperatorError
from kybernate.containerd_api import _namespace_names
from shim.wire import WireError, encode_bytes_field, encode_varint_field, fields, _encode_varint


def test_a_valid_message_reads_back():
    data = (encode_varint_field(1, 300) + encode_bytes_field(2, b"abc") + encode_bytes_field(3, b"")
            + b"\x21" + (7).to_bytes(8, "little") + b"\x2d" + (9).to_bytes(4, "little"))
    assert fields(data) == [(1, 300), (2, b"abc"), (3, b""), (4, 7), (5, 9)]
    assert fields(b"") == []


def test_largest_values_are_accepted():
    top = (1 << 29) - 1
    data = _encode_varint(top << 3) + _encode_varint((1 << 64) - 1)
    assert fields(data) == [(top, (1 << 64) - 1)]


@pytest.mark.parametrize("data,message", [
    (b"\x80", "truncated varint"),                                  # the key itself
    (b"\x08", "truncated varint"),                                  # key, no value
    (b"\x08\x80\x80", "truncated varint"),                          # value cut inside
    (b"\x0a", "truncated varint"),                                  # length missing
    (b"\x0a\x05abc", "field 1: length 5 runs past the end of the message (3 bytes left)"),
    (b"\x0a\x01", "field 1: length 1 runs past the end"),
    (b"\x12" + _encode_varint((1 << 64) - 1) + b"x", f"field 2: length {(1 << 64) - 1} runs past the end"),
    (b"\x12" + _encode_varint(1 << 31) + b"x" * 16, f"field 2: length {1 << 31} runs past the end"),
    (b"\x08" + b"\xff" * 9 + b"\x02", "varint exceeds 64 bits"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "varint longer than 10 bytes"),
    (b"\x09\x01\x02\x03", "field 1: truncated fixed64"),
    (b"\x0d\x01\x02", "field 1: truncated fixed32"),
    (b"\x00\x01", "invalid field number 0"),
    (_encode_varint((1 << 29) << 3), f"invalid field number {1 << 29}"),
    (b"\x0b", "field 1: unsupported wire type 3"),                  # start group
    (b"\x0c", "field 1: unsupported wire type 4"),                  # end group
    (b"\x0e", "field 1: unsupported wire type 6"),
    (b"\x0f", "field 1: unsupported wire type 7"),
])
def test_bad_bytes_are_a_wire_error(data, message):
    with pytest.raises(WireError) as exc:
        fields(data)
    assert str(exc.value).startswith(message), str(exc.value)


@given(st.binary(max_size=64))
def test_any_bytes_read_or_raise_wire_error(data):
    try:
        out = fields(data)
    except WireError:
        return
    for number, value in out:
        assert 1 <= number < (1 << 29) and isinstance(value, (int, bytes))


@given(st.lists(st.tuples(st.integers(1, (1 << 29) - 1), st.one_of(st.integers(1, (1 << 64) - 1),
                                                                     st.binary(max_size=40))), max_size=8))
def test_what_we_write_we_read(pairs):
    data = b"".join(encode_bytes_field(n, v) if isinstance(v, bytes) else encode_varint_field(n, v)
                    for n, v in pairs)
    assert fields(data) == pairs


# ---- the operator's namespace list, read with this reader ---------------------------------------------
def _namespace(name: bytes) -> bytes:
    return encode_bytes_field(1, encode_bytes_field(1, name))


def test_namespace_list_reads_names():
    assert _namespace_names(_namespace(b"default") + _namespace(b"k8s.io")) == ["default", "k8s.io"]


@pytest.mark.parametrize("raw,detail", [
    (_namespace(b"default")[:-2], "length"),                          # cut short: no half name
    (b"\x0a\x04\x0a\x05ab", "field 1: length 5 runs past the end"),   # inner length past the inner end
    (b"\x0a" + _encode_varint(1 << 40), "runs past the end"),          # huge outer length
    (_namespace(b"\xff\xfe"), "utf-8"),
    (b"\x0b", "wire type 3"),
])
def test_namespace_list_that_does_not_parse_is_one_operator_error(raw, detail):
    with pytest.raises(OperatorError) as exc:
        _namespace_names(raw)
    assert str(exc.value).startswith("cannot decode containerd's namespace list: ")
    assert detail in str(exc.value)
