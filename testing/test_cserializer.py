"""C-only tests of the native serializer ``execnet._execnet``.

Covers byte-exact output (WIRE.md examples and the stock golden vectors),
round trips, DumpError cases, and the decoder as a hostile-input surface:
truncation, huge and negative length prefixes, deep nesting, bad 'P'
targets, trailing data and a seeded random fuzz loop that must only ever
raise LoadError.
"""
import importlib.util
import json
import math
import os
import random
import struct
import sys
import threading

import pytest

_shared = pytest.importorskip("execnet._execnet")


def _fresh_module():
    """A new instance of the extension module, with its own module state
    (multi-phase init makes each instance independent)."""
    spec = importlib.util.find_spec("execnet._execnet")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tests configure a private instance, so the classes execnet.gateway_base
# gave the shared instance stay in place for the rest of the test run.
_execnet = _fresh_module()

pytestmark = pytest.mark.c_extension

MAX_DEPTH = 1000
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_dumps.json")


class DataFormatError(Exception):
    pass


class DumpError(DataFormatError):
    pass


class LoadError(DataFormatError):
    pass


class Channel:
    def __init__(self, id):
        self.id = id

    def __repr__(self):
        return "<Channel id=%d>" % self.id


@pytest.fixture(autouse=True)
def configured():
    """(Re)configure our instance with the local classes before each test."""
    _execnet.configure(DumpError, LoadError, DataFormatError, Channel)
    yield _execnet


def dumps(obj):
    return _execnet.dumps(obj)


def loads(data, **kw):
    return _execnet.loads(data, **kw)


def i32(n):
    return struct.pack("!i", n)


def same(a, b):
    """Equality that also checks types and treats nan == nan, -0.0 != 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("!d", a) == struct.pack("!d", b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (list(a.keys()) == list(b.keys())
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, Channel):
        return a.id == b.id
    return a == b


# ---------------------------------------------------------------------------
# Byte-exact output

WIRE_EXAMPLES = [
    (None, "4c51"),
    (True, "5251"),
    (False, "4351"),
    (5, "460000000551"),
    (-5, "46fffffffb51"),
    (2**31, "480000000a" + b"2147483648".hex() + "51"),
    (1.5, "443ff800000000000051"),
    (b"ab", "4100000002" + b"ab".hex() + "51"),
    ("h\xe9", "4e0000000368c3a951"),
    ([7, 8], "4b00000002460000000046000000075046000000014600000008" "5051"),
    ((7, "a"), "46000000074e00000001" + b"a".hex() + "400000000251"),
    ({1: 2}, "4a4600000001460000000250" "51"),
    ({3}, "46000000034f0000000151"),
]


@pytest.mark.parametrize("obj,hexpayload", WIRE_EXAMPLES,
                         ids=[repr(o) for o, _ in WIRE_EXAMPLES])
def test_wire_examples(obj, hexpayload):
    assert dumps(obj).hex() == hexpayload
    assert same(loads(bytes.fromhex(hexpayload)), obj)


def test_int_boundaries():
    assert dumps(2**31 - 1) == b"F" + i32(2**31 - 1) + b"Q"
    assert dumps(-2**31) == b"F" + i32(-2**31) + b"Q"
    assert dumps(-2**31 - 1) == b"H" + i32(11) + b"-2147483649Q"
    big = -(10**40)
    text = str(big).encode()
    assert dumps(big) == b"H" + i32(len(text)) + text + b"Q"


def test_float_bits():
    for value in [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"),
                  5e-324, 1e300]:
        assert dumps(value) == b"D" + struct.pack("!d", value) + b"Q"
    assert dumps(complex(1, -2)) == (
        b"T" + struct.pack("!dd", 1.0, -2.0) + b"Q")


def test_utf8_encoding_matches_codec():
    samples = ["", "abc", "\xe9", "\xff\x00", "\u0100", "\u07ff", "\u0800",
               "\ud7ff\ue000", "\uffff", "\U00010000", "\U0010ffff",
               "mixed \xe9 \u65e5 \U0001f600 end", "\x7f\x80"]
    for s in samples:
        encoded = s.encode("utf-8")
        assert dumps(s) == b"N" + i32(len(encoded)) + encoded + b"Q"
        assert loads(dumps(s)) == s


def test_short_strings_decode_right_through_the_cache():
    # Short ASCII strings are shared through a small direct-mapped cache:
    # whatever collides or is evicted, every decoded string is the right
    # one, exactly a str, with the right hash.
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz_$[]:/.-0123456789"
    words = ["", "a", "passed", "call", "\x7f", "x" * 47, "y" * 48, "z" * 49,
             "caf\xe9", "\u65e5\u672c", "a\x00b"]
    words += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 50)))
              for _ in range(3000)]
    for _ in range(3):
        rng.shuffle(words)
        batch = loads(dumps(words))
        assert batch == words
        for got, want in zip(batch, words):
            assert type(got) is str and hash(got) == hash(want)
        keyed = loads(dumps({w: i for i, w in enumerate(words)}))
        assert keyed == {w: i for i, w in enumerate(words)}
    # an interned-looking key and the same text as a value stay equal
    assert loads(dumps({"k": "k", "kk": ["k", "kk"]})) == {"k": "k", "kk": ["k", "kk"]}


def test_large_bytes_single_payload():
    data = os.urandom(1 << 20) * 3
    out = dumps(data)
    assert out[:5] == b"A" + i32(len(data))
    assert out[5:-1] == data and out[-1:] == b"Q"
    assert loads(out) == data


def test_many_items_grow_buffer():
    obj = [{"k%d" % i: (i, str(i) * (i % 7), -i * 10**12)} for i in range(3000)]
    assert same(loads(dumps(obj)), obj)


# ---------------------------------------------------------------------------
# Round trips

ROUND_TRIP = [
    None, True, False, 0, 1, -1, 2**31 - 1, -2**31, 2**31, -2**31 - 1,
    2**63, -2**63, -2**63 - 1, 2**64, 10**100, -(10**100), 2**1000,
    -(2**1000), 0.0, -0.0, 0.1, float("inf"), float("-inf"), float("nan"),
    complex(0, 0), complex(-1.5, 0.25), complex(float("nan"), float("inf")),
    b"", b"\x00\xff" * 100, "", "hello", "\u65e5\u672c\u8a9e\U0001f600",
    "\x00", [], (), {}, set(), frozenset(), [[]], ((),),
    [None, 1, "a", b"b", 1.5, (2,), {3: 4}, {5}, frozenset([6])],
    {"a": [1, (2, 3)], "b": {"c": None}, (1, 2): "x", None: True, 3.5: b""},
    {frozenset([1, 2]), (1, "x"), -2**40},
    (1, [2, {3: (4, [5, {6}])}]),
    list(range(-300, 300)),
    {"nodeid": "tests/test_mod.py::TestX::test_a[1-2]",
     "location": ("tests/test_mod.py", 41, "TestX.test_a[1-2]"),
     "keywords": {"test_a[1-2]": 1, "TestX": 1, "parametrize": 1},
     "outcome": "passed", "longrepr": None, "when": "call",
     "user_properties": [], "sections": [], "duration": 0.0012,
     "start": 1700000000.25, "stop": 1700000000.5},
]


@pytest.mark.parametrize("obj", ROUND_TRIP, ids=[str(i) for i in
                                                 range(len(ROUND_TRIP))])
def test_round_trip(obj):
    out = dumps(obj)
    assert isinstance(out, bytes) and out.endswith(b"Q")
    back = loads(out)
    assert same(back, obj)
    # Re-encoding is byte-identical (not for sets: their iteration order
    # depends on insertion history and str hash randomization).
    if not isinstance(obj, (set, frozenset)):
        assert dumps(back) == out


def test_round_trip_random_structures():
    rng = random.Random(1234)

    def scalar():
        return rng.choice([
            None, True, False, rng.randint(-2**31, 2**31 - 1),
            rng.randint(-2**80, 2**80), rng.random() * 1e6,
            complex(rng.random(), -rng.random()), rng.randbytes(rng.randint(0, 20)),
            "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF),
                                    rng.randint(0x10000, 0x10FFFF)]))
                    for _ in range(rng.randint(0, 10))),
        ])

    def hashable(depth):
        if depth > 3 or rng.random() < 0.6:
            value = scalar()
            return value
        return tuple(hashable(depth + 1) for _ in range(rng.randint(0, 3)))

    def build(depth):
        r = rng.random()
        if depth > 5 or r < 0.4:
            return scalar()
        if r < 0.55:
            return [build(depth + 1) for _ in range(rng.randint(0, 5))]
        if r < 0.7:
            return tuple(build(depth + 1) for _ in range(rng.randint(0, 5)))
        if r < 0.85:
            return {hashable(depth): build(depth + 1)
                    for _ in range(rng.randint(0, 5))}
        if r < 0.93:
            return {hashable(depth) for _ in range(rng.randint(0, 5))}
        return frozenset(hashable(depth) for _ in range(rng.randint(0, 5)))

    for _ in range(500):
        obj = build(0)
        out = dumps(obj)
        back = loads(out)
        if isinstance(obj, (set, frozenset)):
            assert back == obj
        else:
            assert same(back, obj), obj


def test_nesting_limit_exact_round_trip():
    obj = []
    for _ in range(MAX_DEPTH - 1):
        obj = [obj]
    old = sys.getrecursionlimit()
    # Python 3.10/3.11 count C recursion against the interpreter's limit.
    sys.setrecursionlimit(max(old, 10000))
    try:
        out = dumps(obj)
        back = loads(out)
        with pytest.raises(DumpError, match="too deeply nested"):
            dumps([obj])
    finally:
        sys.setrecursionlimit(old)
    depth = 0
    while back:
        back = back[0]
        depth += 1
    assert depth == MAX_DEPTH - 1


# ---------------------------------------------------------------------------
# Channels

def test_channel_dumps_and_factory():
    class SubChannel(Channel):
        pass

    assert dumps(Channel(5)) == b"B" + i32(5) + b"Q"
    assert dumps(SubChannel(-2)) == b"B" + i32(-2) + b"Q"
    calls = []

    def factory(id):
        calls.append(id)
        return Channel(id)

    obj = [Channel(1), {"c": Channel(2**31 - 1)}, (Channel(-2**31),)]
    back = loads(dumps(obj), channel_factory=factory)
    assert calls == [1, 2**31 - 1, -2**31]
    assert same(back, obj)


def test_channel_errors():
    with pytest.raises(LoadError, match="channel_factory"):
        loads(dumps(Channel(3)))
    with pytest.raises(LoadError, match="channel_factory"):
        loads(dumps(Channel(3)), channel_factory=None)
    with pytest.raises(DumpError):
        dumps(Channel(2**31))
    with pytest.raises(DumpError):
        dumps(Channel("x"))

    class NoId(Channel):
        def __init__(self):
            pass

    with pytest.raises(DumpError):
        dumps(NoId())

    def failing(id):
        raise KeyError(id)

    with pytest.raises(KeyError):
        loads(dumps([Channel(9)]), channel_factory=failing)


# ---------------------------------------------------------------------------
# DumpError

class MyInt(int):
    pass


class MyStr(str):
    pass


class MyDict(dict):
    pass


class MyTuple(tuple):
    pass


def _unsupported():
    import collections
    import decimal
    import enum

    Color = enum.IntEnum("Color", "RED GREEN")
    return [
        object(), int, len, Ellipsis, range(3), bytearray(b"ab"),
        memoryview(b"ab"), decimal.Decimal("1.5"), Color.RED,
        collections.OrderedDict([(1, 2)]), collections.defaultdict(int),
        MyInt(3), MyStr("x"), MyDict(), MyTuple(), [1, object()],
        {"a": bytearray(b"x")}, {object(): 1}, (1, (2, MyInt(3))),
        {frozenset([1]), (MyStr("x"),)}, lambda: 1,
    ]


@pytest.mark.parametrize("obj", _unsupported(), ids=lambda o: type(o).__name__)
def test_unsupported_types(obj):
    with pytest.raises(DumpError, match="can't serialize <"):
        dumps(obj)


def test_dumperror_names_type():
    import collections

    with pytest.raises(DumpError) as info:
        dumps(collections.OrderedDict())
    assert str(info.value) == "can't serialize <class 'collections.OrderedDict'>"


def test_lone_surrogate():
    for s in ["\ud800", "a\udfff", "x" * 100 + "\udc80", "\U0001f600\ud800"]:
        with pytest.raises(DumpError, match="utf-8 encodable") as info:
            dumps([s])
        assert isinstance(info.value.__cause__, UnicodeEncodeError)


def test_recursive_structures():
    lst = [1]
    lst.append(lst)
    d = {}
    d["self"] = d
    t = [[]]
    t[0].append(t)
    for obj in [lst, d, t, (lst,)]:
        with pytest.raises(DumpError, match="too deeply nested"):
            dumps(obj)


def test_deep_structure_dumps():
    obj = None
    for _ in range(100000):
        obj = (obj,)
    with pytest.raises(DumpError, match="too deeply nested"):
        dumps(obj)


def test_deep_structure_in_thread():
    """A fresh thread has a shallow Python stack; our own bound still holds."""
    result = []

    def run():
        obj = []
        for _ in range(MAX_DEPTH + 5):
            obj = [obj]
        try:
            dumps(obj)
        except DumpError as exc:
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(result) == 1


@pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"),
                    reason="no int max str digits limit")
def test_int_too_long_for_str():
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(1000)
    try:
        with pytest.raises(DumpError):
            dumps(10**2000)
        with pytest.raises(LoadError):
            loads(b"H" + i32(2001) + b"1" + b"0" * 2000 + b"Q")
    finally:
        sys.set_int_max_str_digits(old)
    assert loads(dumps(10**2000)) == 10**2000


def test_mutation_during_dumps_does_not_crash():
    victim = []

    class Evil(Channel):
        def __init__(self):
            pass

        @property
        def id(self):
            victim.clear()
            return 7

    victim.extend([Evil(), 1, 2, "three", Evil()])
    out = dumps(victim)
    # The list shrank while it was written: the count says what was written.
    assert out.startswith(b"K" + i32(1))
    back = loads(out, channel_factory=Channel)
    assert len(back) == 1 and back[0].id == 7

    dvictim = {}

    class EvilD(Channel):
        def __init__(self):
            pass

        @property
        def id(self):
            dvictim.clear()
            return 8

    dvictim.update({i: EvilD() for i in range(10)})
    dumps(dvictim)

    svictim = set()

    class EvilS(Channel):
        def __init__(self):
            pass

        @property
        def id(self):
            svictim.add(object())
            return 9

    svictim.update([EvilS(), 1, 2])
    with pytest.raises(RuntimeError):
        dumps(svictim)


# ---------------------------------------------------------------------------
# Frames

def test_dumps_frame():
    obj = {"x": [1, 2.5, "s"]}
    frame = _execnet.dumps_frame(4, 17, obj)
    payload = dumps(obj)
    assert frame == struct.pack("!bii", 4, 17, len(payload)) + payload
    frame = _execnet.dumps_frame(-128, -2**31, b"z" * 100000)
    assert frame[:9] == struct.pack("!bii", -128, -2**31, 100006)
    assert loads(frame[9:]) == b"z" * 100000
    with pytest.raises(DumpError):
        _execnet.dumps_frame(4, 1, object())
    with pytest.raises(ValueError):
        _execnet.dumps_frame(128, 1, None)
    with pytest.raises(OverflowError):
        _execnet.dumps_frame(1, 2**31, None)
    with pytest.raises(TypeError):
        _execnet.dumps_frame(1, 2)


def test_raw_frame():
    assert _execnet.frame(2, 0, None) == struct.pack("!bii", 2, 0, 0)
    assert _execnet.frame(5, 3, b"") == struct.pack("!bii", 5, 3, 0)
    assert _execnet.frame(4, -7, b"abc") == struct.pack("!bii", 4, -7, 3) + b"abc"
    assert _execnet.frame(4, 1, bytearray(b"xy")) == (
        struct.pack("!bii", 4, 1, 2) + b"xy")
    assert _execnet.frame(4, 1, memoryview(b"0123")[1:3]) == (
        struct.pack("!bii", 4, 1, 2) + b"12")
    with pytest.raises(ValueError):
        _execnet.frame(-129, 1, None)
    with pytest.raises(TypeError):
        _execnet.frame(1, 1, "text")


# ---------------------------------------------------------------------------
# loads: API

def test_loads_buffer_types():
    out = dumps({"a": [1, 2, (3, b"x")]})
    expected = loads(out)
    assert loads(bytearray(out)) == expected
    assert loads(memoryview(out)) == expected
    assert loads(memoryview(b"junk" + out + b"junk")[4:-4]) == expected
    assert loads(data=out) == expected
    with pytest.raises(TypeError):
        loads("LQ")
    with pytest.raises(TypeError):
        loads(out, bogus=1)
    with pytest.raises(TypeError):
        _execnet.loads()


def test_load_only_opcodes():
    assert loads(b"G" + i32(-3) + b"Q") == -3
    assert loads(b"I" + i32(3) + b"-12Q") == -12
    assert loads(b"M" + i32(2) + b"\xe9xQ") == b"\xe9x"
    assert loads(b"M" + i32(2) + b"\xe9xQ", py2str_as_py3str=True) == "\xe9x"
    assert _execnet.loads(b"M" + i32(2) + b"\xe9xQ", None, True) == "\xe9x"
    # py3str_as_py2str: N loads as its bytes, unchecked; M and S unaffected
    n = b"N" + i32(2) + b"\xe9xQ"
    assert loads(n, py3str_as_py2str=True) == b"\xe9x"
    assert _execnet.loads(n, None, False, True) == b"\xe9x"
    assert _execnet.loads(n, None, True, 1) == b"\xe9x"
    assert _execnet.loads(b"N" + i32(1) + b"aQ", None, True, 0) == "a"
    assert loads(b"M" + i32(2) + b"\xe9xQ", py3str_as_py2str=True) == b"\xe9x"
    assert loads(b"S" + i32(2) + b"\xc3\xa9Q", py3str_as_py2str=True) == "\xe9"
    with pytest.raises(TypeError, match="at most 4"):
        _execnet.loads(n, None, False, True, 5)
    with pytest.raises(TypeError, match="multiple values"):
        _execnet.loads(n, None, False, True, py3str_as_py2str=True)
    assert loads(b"S" + i32(2) + b"\xc3\xa9Q") == "\xe9"
    assert loads(b"H" + i32(3) + b"007Q") == 7
    assert loads(b"H" + i32(2) + b"-0Q") == 0
    assert loads(b"H" + i32(25) + b"1" * 25 + b"Q") == int("1" * 25)
    assert loads(b"H" + i32(19) + b"-" + b"9" * 18 + b"Q") == -int("9" * 18)
    # An unfilled list slot stays None, as stock's [None] * n would.
    assert loads(b"K" + i32(2) + b"F" + i32(1) + b"RP" + b"LLLLLLL"
                 + b"@" + i32(7) + b"@" + i32(2) + b"Q") == (
        ([None, True], (None,) * 7))
    # Negative list index behaves like list[-1] = value.
    assert loads(b"K" + i32(2) + b"F" + i32(-1) + b"RP" + b"LLLLLLL"
                 + b"@" + i32(7) + b"@" + i32(2) + b"Q") == (
        ([None, True], (None,) * 7))


# ---------------------------------------------------------------------------
# loads: hostile input

def assert_load_error(data, match=None, **kw):
    with pytest.raises(LoadError, match=match):
        loads(data, **kw)


def test_every_truncation():
    obj = [None, True, 1, 2**40, -2**40, 1.5, complex(1, 2), b"bytes",
           "str\xe9", (1, 2), {3: {4}}, frozenset([5]), Channel(6), []]
    out = dumps(obj)
    for i in range(len(out)):
        assert_load_error(out[:i], channel_factory=Channel)
    # and every extension by one byte is trailing data
    assert_load_error(out + b"Q", match="trailing data", channel_factory=Channel)


@pytest.mark.parametrize("op", [b"A", b"N", b"H", b"I", b"M", b"S", b"K"])
def test_huge_length_prefix(op):
    assert_load_error(op + b"\x7f\xff\xff\xff" + b"Q")
    assert_load_error(op + b"\x7f\xff\xff\xff" + b"x" * 100 + b"Q")
    assert_load_error(op + b"\x7f\xff\xff\xff")


@pytest.mark.parametrize("op", [b"A", b"N", b"M", b"S", b"H"])
def test_length_boundaries(op):
    body = b"123"
    assert loads(op + i32(3) + body + b"Q") in (b"123", "123", 123)
    assert_load_error(op + i32(4) + body + b"Q", match="truncated|digits")
    assert_load_error(op + i32(5) + body + b"Q", match="exceeds")
    # A length that would reach past the view into the underlying buffer.
    view = memoryview(op + i32(4) + body + b"Q" + b"QQQQ")[:9]
    assert_load_error(view)


@pytest.mark.parametrize("op", [b"A", b"N", b"H", b"K", b"M", b"S", b"@",
                                b"O", b"E"])
def test_negative_length(op):
    assert_load_error(b"L" + op + i32(-1) + b"Q", match="negative")
    assert_load_error(b"L" + op + b"\x80\x00\x00\x00" + b"Q", match="negative")


def test_count_exceeds_stack():
    assert_load_error(b"LL@" + i32(3) + b"Q", match="exceeds")
    assert_load_error(b"O" + i32(1) + b"Q", match="exceeds")
    assert_load_error(b"LE" + i32(0x7fffffff) + b"Q", match="exceeds")


def test_list_size_bounded_by_input():
    # Each list item needs >= 7 bytes of input.
    assert_load_error(b"K" + i32(2) + b"F" + i32(0) + b"LPQ", match="exceeds")
    assert_load_error(b"K" + i32(1000) + b"Q" * 100)
    # Many lists together can't promise more items than the input holds.
    data = (b"K" + i32(10)) * 200 + b"Q"
    assert_load_error(data)


@pytest.mark.parametrize("op", [0x00, 0x01, 0x02, ord("Z"), ord("a"), 0x80,
                                0xFF, ord(" "), ord("'")])
def test_unknown_opcode(op):
    with pytest.raises(LoadError, match="unknown opcode .*offset 1") as info:
        loads(b"L" + bytes([op]) + b"Q")
    assert "0x%02x" % op in str(info.value)


def test_version_byte_is_not_accepted():
    assert_load_error(b"\x02LQ", match="unknown opcode 0x02 at offset 0")


def test_stop_with_wrong_stack():
    assert_load_error(b"Q", match="expected 1")
    assert_load_error(b"LLQ", match="expected 1")
    assert_load_error(b"", match="truncated")
    assert_load_error(b"L", match="truncated")


def test_trailing_data():
    assert_load_error(b"LQQ", match="trailing data")
    assert_load_error(b"LQL", match="trailing data")
    assert_load_error(dumps([1, 2]) + b"\x00", match="trailing data")


def test_bad_setitem_targets():
    assert_load_error(b"LLLPQ", match="not a list or dict")       # None
    assert_load_error(b"@" + i32(0) + b"LLPQ", match="not a list or dict")
    assert_load_error(b"O" + i32(0) + b"LLPQ", match="not a list or dict")
    assert_load_error(b"LLPQ", match="needs a container")
    assert_load_error(b"PQ", match="needs a container")
    k1 = b"K" + i32(1)
    assert_load_error(k1 + b"F" + i32(1) + b"LPQ", match="out of range")
    assert_load_error(k1 + b"F" + i32(-2) + b"LPQ", match="out of range")
    assert_load_error(k1 + b"H" + i32(30) + b"9" * 30 + b"LPQ" + b"\0" * 50,
                      match="out of range")
    pad = b"\0" * 8  # never reached; satisfies the 7-bytes-per-item bound
    assert_load_error(k1 + b"N" + i32(1) + b"0LPQ" + pad, match="must be int")
    assert_load_error(k1 + b"LLPQ" + pad, match="must be int")
    assert_load_error(k1 + b"J" + b"LPQ" + pad, match="must be int")


def test_unhashable():
    with pytest.raises(LoadError, match="unhashable dict key") as info:
        loads(b"J" + b"K" + i32(0) + b"LPQ")
    assert isinstance(info.value.__cause__, TypeError)
    assert_load_error(b"JJLPQ", match="unhashable dict key")
    assert_load_error(b"J" + b"K" + i32(0) + b"@" + i32(1) + b"LPQ",
                      match="unhashable dict key")
    assert_load_error(b"J" + b"O" + i32(1) + b"Q", match="unhashable set item")
    assert_load_error(b"LJE" + i32(2) + b"Q", match="unhashable set item")


def test_invalid_utf8():
    for raw in [b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"]:
        for op in (b"N", b"S"):
            with pytest.raises(LoadError, match="invalid UTF-8") as info:
                loads(op + i32(len(raw)) + raw + b"Q")
            assert isinstance(info.value.__cause__, UnicodeDecodeError)


@pytest.mark.parametrize("digits", [b"", b"-", b"+5", b" 5", b"5 ", b"1_0",
                                    b"0x1f", b"--1", b"1-", b"\xd9\xa1",
                                    b"1" * 30 + b"a", b"12.5", b"\x00"])
def test_bad_int_digits(digits):
    assert_load_error(b"H" + i32(len(digits)) + digits + b"Q")


def test_deep_nesting_lists_no_recursion():
    n = 100000
    data = (b"K" + i32(1) + b"F" + i32(0)) * n + b"K" + i32(0) + b"P" * n + b"Q"
    assert_load_error(data, match="nested deeper")


def test_deep_nesting_tuples_no_recursion():
    n = 100000
    assert_load_error(b"L" + (b"@" + i32(1)) * n + b"Q", match="nested deeper")
    # Used as a dict key, a deep tuple would have to be hashed recursively.
    assert_load_error(b"J" + b"L" + (b"@" + i32(1)) * n + b"LPQ",
                      match="nested deeper")


def test_deep_nesting_dicts_and_sets():
    n = 100000
    data = (b"JL") * n + b"J" + b"P" * n + b"Q"
    assert_load_error(data, match="nested deeper")
    assert_load_error(b"L" + (b"E" + i32(1)) * n + b"Q", match="nested deeper")


def test_depth_limit_is_exact():
    def nested(depth):
        return ((b"K" + i32(1) + b"F" + i32(0)) * (depth - 1) + b"K" + i32(0)
                + b"P" * (depth - 1) + b"Q")

    back = loads(nested(MAX_DEPTH))
    assert isinstance(back, list)
    assert_load_error(nested(MAX_DEPTH + 1), match="nested deeper")
    assert isinstance(loads(b"L" + (b"@" + i32(1)) * (MAX_DEPTH) + b"Q"), tuple)
    assert_load_error(b"L" + (b"@" + i32(1)) * (MAX_DEPTH + 1) + b"Q")


def test_many_small_objects():
    n = 200000
    back = loads(b"L" * n + b"@" + i32(n) + b"Q")
    assert back == (None,) * n


def _fuzz_seeds():
    return [
        dumps([None, True, False, 1, -2**40, 2**70, 1.5, complex(1, 2), b"xy",
               "z\xe9\u65e5", (1, (2,)), {"k": [3, {4}], (5,): frozenset([6])},
               set(), Channel(4)]),
        dumps({"nodeid": "t.py::a", "location": ("t.py", 1, "a"),
               "keywords": {"a": 1}, "outcome": "passed", "duration": 0.5}),
        b"M" + i32(3) + b"abcS" + i32(1) + b"xG" + i32(1) + b"I" + i32(1)
        + b"7@" + i32(4) + b"Q",
    ]


def _check_fuzz(data, factory):
    try:
        loads(data, channel_factory=factory)
    except LoadError:
        pass


def test_fuzz_random_bytes():
    rng = random.Random(20240601)
    alphabet = b"LRCFHDTANKJ@OEPBQGIMS\x00\x01\xff\x7f"
    for i in range(3000):
        size = rng.randint(0, 64)
        if i % 2:
            data = bytes(rng.choice(alphabet) for _ in range(size))
        else:
            data = rng.randbytes(size)
        _check_fuzz(data, Channel if i % 3 else None)


def test_fuzz_mutated_payloads():
    rng = random.Random(987654321)
    seeds = _fuzz_seeds()
    for i in range(4000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            action = rng.random()
            pos = rng.randrange(len(data) + 1)
            if action < 0.4 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif action < 0.6:
                data.insert(pos, rng.choice(b"LFHKJ@OEPQ\x7f\x80\xff\x00"))
            elif action < 0.8 and data:
                del data[pos:pos + rng.randint(1, 8)]
            else:
                chunk = rng.choice(seeds)
                start = rng.randrange(len(chunk))
                data[pos:pos] = chunk[start:start + rng.randint(1, 20)]
        _check_fuzz(bytes(data), Channel if i % 2 else None)


def test_error_chain_context_free():
    """A LoadError raised inside an except block still carries its own cause."""
    try:
        raise KeyError("outer")
    except KeyError:
        with pytest.raises(LoadError) as info:
            loads(b"N" + i32(1) + b"\xffQ")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


# ---------------------------------------------------------------------------
# Module state

def test_unconfigured_module_raises_runtime_error():
    fresh = _fresh_module()
    assert fresh is not _execnet and fresh is not _shared
    with pytest.raises(RuntimeError, match="configure"):
        fresh.dumps(1)
    with pytest.raises(RuntimeError, match="configure"):
        fresh.loads(b"LQ")
    with pytest.raises(RuntimeError, match="configure"):
        fresh.dumps_frame(4, 1, None)
    assert fresh.frame(2, 0, None) == struct.pack("!bii", 2, 0, 0)

    class OtherDumpError(Exception):
        pass

    fresh.configure(OtherDumpError, LoadError, DataFormatError, Channel)
    with pytest.raises(OtherDumpError):
        fresh.dumps(object())
    # Other instances keep their own configuration.
    with pytest.raises(DumpError):
        _execnet.dumps(object())


def test_configure_validates():
    with pytest.raises(TypeError):
        _execnet.configure(DumpError, LoadError, DataFormatError, "notaclass")
    with pytest.raises(TypeError):
        _execnet.configure(object, LoadError, DataFormatError, Channel)
    with pytest.raises(TypeError):
        _execnet.configure(DumpError, LoadError, DataFormatError)


# ---------------------------------------------------------------------------
# Golden vectors captured from stock execnet (testing/make_golden.py)

def _golden():
    if not os.path.exists(GOLDEN):
        return []
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.mark.skipif(not os.path.exists(GOLDEN),
                    reason="testing/data/golden_dumps.json not generated yet")
def test_golden_dumps():
    entries = _golden()
    checked = 0
    for entry in entries:
        obj = eval(entry["expr"])
        if "hex" in entry:
            expected = bytes.fromhex(entry["hex"])
            assert b"\x02" + dumps(obj) == expected, entry["name"]
            back = loads(expected[1:])
            assert same(back, obj) or (
                isinstance(obj, (set, frozenset)) and back == obj), entry["name"]
            checked += 1
        elif entry.get("error") == "DumpError":
            with pytest.raises(DumpError):
                dumps(obj)
            checked += 1
        else:
            # Stock crashes (struct.error) on ints below -2**31; we write 'H'.
            assert isinstance(obj, int) and obj < -2**31, entry["name"]
            assert loads(dumps(obj)) == obj
            assert dumps(obj)[:1] == b"H"
            checked += 1
    assert checked == len(entries) > 0
