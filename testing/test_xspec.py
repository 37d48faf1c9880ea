import pytest

from execnet import XSpec


def test_keys_and_env():
    spec = XSpec("popen//python=python3//chdir=/tmp//env:FOO=bar//nice=5")
    assert spec.popen is True
    assert spec.python == "python3"
    assert spec.chdir == "/tmp"
    assert spec.env == {"FOO": "bar"}
    assert spec.nice == "5"
    for key in ("id", "ssh", "socket", "via", "dont_write_bytecode", "execmodel",
                "installvia", "vagrant_ssh", "ssh_config"):
        assert getattr(spec, key) is None
    assert spec.anything_unknown is None
    with pytest.raises(AttributeError):
        spec._private  # noqa: B018
    assert XSpec("popen//weird=1").weird == "1"
    assert XSpec("popen//python=a=b").python == "a=b"
    assert XSpec("popen").env == {}
    assert XSpec("ssh=user@host//ssh_config=cfg").ssh == "user@host"


def test_equality_hash_repr():
    a, b = XSpec("popen//id=x"), XSpec("popen//id=x")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != XSpec("popen")
    assert a != "popen//id=x"
    assert repr(a) == "<XSpec 'popen//id=x'>"
    assert str(a) == "popen//id=x"


def test_bad_specs():
    with pytest.raises(IndexError):
        XSpec("")
    with pytest.raises(IndexError):
        XSpec("popen////x")


def test_duplicate_keys():
    # as stock execnet: a key twice is an error, an env: name twice is not
    with pytest.raises(ValueError, match="duplicate key: 'id' in 'popen//id=a//id=b'"):
        XSpec("popen//id=a//id=b")
    with pytest.raises(ValueError, match="duplicate key: 'popen'"):
        XSpec("popen//popen")
    assert XSpec("popen//env:X=1//env:X=2").env == {"X": "2"}
