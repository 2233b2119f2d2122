import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drcl.data.jsonstream import NotStreamable, stream_object


def _stream(path, keys=("images", "annotations"), **kwargs):
    got = {k: [] for k in keys}
    values, counts = stream_object(path, {k: (lambda x, n, k=k: got[k].append((n, x))) for k in keys}, **kwargs)
    return values, counts, got


def _check_against_json(path, **kwargs):
    """What stream_object hands out is what json.loads reads, element by element."""
    ref = json.loads(path.read_bytes())
    values, counts, got = _stream(path, **kwargs)
    for key, value in ref.items():
        if key in got and isinstance(value, list):
            assert counts[key] == len(value)
            assert got[key] == list(enumerate(value))
            assert key not in values
        else:
            assert values[key] == value and key not in counts


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(
    images=st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=6),
    annotations=st.lists(json_values, max_size=6),
    other=json_values,
    indent=st.sampled_from([None, 0, 2]),
    chunk=st.integers(1, 64),
    margin=st.integers(1, 16),
    order=st.permutations(["images", "annotations", "other"]),
)
def test_elements_and_values_equal_json_loads_at_any_chunk_size(tmp_path_factory, images, annotations, other,
                                                                  indent, chunk, margin, order):
    # tiny chunks put every boundary somewhere: inside numbers, strings, multi-byte UTF-8
    # characters, escapes and whitespace
    doc = {"images": images, "annotations": annotations, "other": other}
    path = tmp_path_factory.mktemp("stream") / "doc.json"
    path.write_text(json.dumps({k: doc[k] for k in order}, indent=indent, ensure_ascii=False), encoding="utf-8")
    _check_against_json(path, chunk=chunk, margin=margin)


def test_a_number_cut_at_the_chunk_end_is_read_whole(tmp_path):
    path = tmp_path / "n.json"
    path.write_text('{"annotations": [123456789, 1.25e10, -7], "x": 1234567}')
    for chunk in range(1, 20):
        _check_against_json(path, chunk=chunk, margin=1)


def test_byte_order_mark_and_non_array_streamed_key(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": {"not": "a list"}, "annotations": []}).encode())
    values, counts, got = _stream(path, chunk=3)
    assert values == {"images": {"not": "a list"}} and counts == {"annotations": 0} and got["images"] == []


def test_transform_cuts_text_before_it_is_parsed(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"annotations": [{"a": "SECRET", "b": 1}, {"a": "SECRET"}]}')
    _, _, got = _stream(path, chunk=4, margin=2, transform=lambda text: text.replace('"SECRET"', "0"))
    assert got["annotations"] == [(0, {"a": 0, "b": 1}), (1, {"a": 0})]


@pytest.mark.parametrize("text", [
    "[]",                                         # not an object
    '{"images": [1, 2}',                          # bad syntax
    '{"images": [1, 2]',                          # truncated
    '{"images": [1, 2]} trailing',                # text after the object
    '{"images": [1], "images": [2]}',             # json.loads keeps the last: left to it
    '{"images": [1,]}',                           # trailing comma
    '{1: 2}',                                     # key not a string
    "",
])
def test_not_streamable(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(NotStreamable):
        _stream(path, chunk=5, margin=2)


def test_not_utf8_is_not_streamable(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"images": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(NotStreamable):
        _stream(path)
