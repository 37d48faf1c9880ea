"""Hypothesis differential tests: the C and pure serializers agree on every
object and on every byte string (decoded value or LoadError alike).

Quick by default; EXECNET_SLOW_TESTS=1 runs many more examples."""
import os
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from execnet import gateway_base as gb  # noqa: E402

if os.environ.get("EXECNET_NO_EXTENSIONS"):
    pytest.skip("needs the native core", allow_module_level=True)
from execnet import _execnet  # noqa: E402 - a broken build must error

pytestmark = pytest.mark.c_extension
EXAMPLES = 3000 if os.environ.get("EXECNET_SLOW_TESTS") else 100

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.complex_numbers(allow_nan=True) | st.text() | st.binary())
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner)
                         | st.frozensets(inner, max_size=3), max_leaves=8)
objects = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(hashables, inner, max_size=4)
                   | st.sets(hashables, max_size=4)
                   | st.frozensets(hashables, max_size=4)),
    max_leaves=20)


def canon(x):
    """A comparable form: floats by their bits (nan, -0.0)."""
    if isinstance(x, float):
        return ("f", struct.pack("!d", x))
    if isinstance(x, complex):
        return ("c", canon(x.real), canon(x.imag))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [canon(i) for i in x])
    if isinstance(x, dict):
        return ("d", sorted((repr(canon(k)), canon(v)) for k, v in x.items()))
    if isinstance(x, (set, frozenset)):
        return (type(x).__name__, sorted(repr(canon(i)) for i in x))
    return x


@settings(max_examples=EXAMPLES, deadline=None)
@given(objects)
def test_dumps_identical_and_roundtrip(obj):
    data = gb._py_dumps_payload(obj)
    assert _execnet.dumps(obj) == data
    assert canon(_execnet.loads(data)) == canon(obj)
    assert canon(gb._py_loads_payload(data)) == canon(obj)


def outcome(loads, data):
    try:
        return ("ok", canon(loads(data)))
    except gb.LoadError:
        return ("LoadError",)


@settings(max_examples=EXAMPLES * 5, deadline=None)
@given(st.binary(max_size=64))
def test_loads_agree_on_arbitrary_bytes(data):
    assert outcome(_execnet.loads, data) == outcome(gb._py_loads_payload, data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(objects, st.data())
def test_loads_agree_on_mutated_payloads(obj, draw):
    data = bytearray(gb._py_dumps_payload(obj))
    for _ in range(draw.draw(st.integers(1, 3))):
        i = draw.draw(st.integers(0, len(data) - 1))
        data[i] = draw.draw(st.integers(0, 255))
    data = bytes(data)
    assert outcome(_execnet.loads, data) == outcome(gb._py_loads_payload, data)
