"""execnet.RSync: mirroring a tree through real popen gateways."""
import ast
import fnmatch
import os
import re
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import execnet
from execnet import rsync as rsync_module
from execnet import rsync_remote

TIMEOUT = 10


@pytest.fixture(scope="module")
def rgroup():
    group = execnet.Group()
    yield group
    group.terminate(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def gw1(rgroup):
    return rgroup.makegateway("popen")


@pytest.fixture(scope="module")
def gw2(rgroup):
    return rgroup.makegateway("popen")


class Recording(execnet.RSync):
    """Counts what is sent; quiet."""

    def __init__(self, sourcedir, **kw):
        kw.setdefault("verbose", False)
        super().__init__(sourcedir, callback=self._cb, **kw)
        self.reported = []
        self.called = []

    def _cb(self, kind, size, channel):
        self.called.append((kind, size, channel))

    def _report_send_file(self, gateway, modified_rel_path):
        self.reported.append((gateway.id, modified_rel_path))


def sync(source, gateway, dest, **options):
    rs = Recording(source)
    rs.add_target(gateway, str(dest), **options)
    rs.send()
    return sorted(rel for _, rel in rs.reported)


def write(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snapshot(root):
    """rel -> ("d",) | ("f", content, mode) | ("l", target) for ``root``."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("d",)
            else:
                with open(path, "rb") as f:
                    result[rel] = ("f", f.read(), stat.S_IMODE(st.st_mode))
    return result


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "source"
    write(src / "top.txt", b"top level\n")
    write(src / "empty")
    write(src / "binary.dat", bytes(range(256)) * 16 + b"\0\0\xff")
    write(src / "a" / "b" / "c" / "deep.txt", b"deep\n")
    write(src / "a" / "mid.py", b"x = 1\n")
    (src / "emptydir").mkdir()
    write(src / "big.bin", os.urandom(5 * 1024 * 1024 + 17))
    return src


ALL_FILES = ["a/b/c/deep.txt", "a/mid.py", "big.bin", "binary.dat", "empty", "top.txt"]


def test_mirror_tree(tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    finished = []
    rs = Recording(tree)
    rs.add_target(gw1, str(dest), finishedcallback=lambda: finished.append(1))
    assert rs.send() is None
    assert finished == [1]
    assert snapshot(dest) == snapshot(tree)
    assert sorted(rel for _, rel in rs.reported) == ALL_FILES
    assert {gwid for gwid, _ in rs.reported} == {gw1.id}
    # callback(kind, size, channel): "list" with the total, an "ack" a file
    sizes = [os.path.getsize(os.path.join(str(tree), rel)) for rel in ALL_FILES]
    kinds = [kind for kind, _, _ in rs.called]
    assert kinds == ["list"] + ["ack"] * len(ALL_FILES)
    assert rs.called[0][1] == sum(sizes)
    assert sorted(size for _, size, _ in rs.called[1:]) == sorted(sizes)
    assert all(isinstance(ch, execnet.Channel) for _, _, ch in rs.called)
    for rel in ALL_FILES:
        assert (os.stat(dest / rel).st_mtime_ns == os.stat(tree / rel).st_mtime_ns), rel


def test_second_send_transfers_nothing(tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    assert sync(tree, gw1, dest) == ALL_FILES
    assert sync(tree, gw1, dest) == []
    assert sync(tree, gw1, dest, delete=True) == []
    assert snapshot(dest) == snapshot(tree)


def test_only_changed_files_are_sent(tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    sync(tree, gw1, dest)
    # a different size
    (tree / "a" / "mid.py").write_bytes(b"x = 12345\n")
    assert sync(tree, gw1, dest) == ["a/mid.py"]
    # the same size, other content, other mtime: the checksum tells
    st = os.stat(tree / "top.txt")
    (tree / "top.txt").write_bytes(b"TOP LEVEL\n")
    os.utime(tree / "top.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert sync(tree, gw1, dest) == ["top.txt"]
    assert (dest / "top.txt").read_bytes() == b"TOP LEVEL\n"
    # only the mtime changed: nothing is sent, the mtime follows
    st = os.stat(tree / "big.bin")
    os.utime(tree / "big.bin", ns=(st.st_atime_ns, st.st_mtime_ns - 7 * 10**9))
    assert sync(tree, gw1, dest) == []
    assert os.stat(dest / "big.bin").st_mtime_ns == st.st_mtime_ns - 7 * 10**9
    assert snapshot(dest) == snapshot(tree)


def test_delete_removes_extras_default_keeps_them(tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    sync(tree, gw1, dest)
    write(dest / "extra.txt", b"extra")
    write(dest / "a" / "b" / "extra" / "inner.txt", b"inner")
    os.symlink("top.txt", dest / "a" / "extralink")
    sync(tree, gw1, dest)
    assert (dest / "extra.txt").exists()
    assert (dest / "a" / "b" / "extra" / "inner.txt").exists()
    assert os.path.islink(dest / "a" / "extralink")
    assert sync(tree, gw1, dest, delete=True) == []
    assert snapshot(dest) == snapshot(tree)


def test_source_deletions_propagate_with_delete(tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    sync(tree, gw1, dest)
    os.unlink(tree / "a" / "b" / "c" / "deep.txt")
    os.rmdir(tree / "a" / "b" / "c")
    sync(tree, gw1, dest, delete=True)
    assert not (dest / "a" / "b" / "c").exists()
    assert snapshot(dest) == snapshot(tree)


def test_filter_excludes_directory_and_pattern(tree, tmp_path, gw1):
    write(tree / "skipme" / "inner" / "x.txt", b"x")
    write(tree / "a" / "mid.pyc", b"compiled")
    write(tree / "keep.pyc.txt", b"kept")
    asked = []

    class Filtered(Recording):
        def filter(self, path):
            asked.append(path)
            name = os.path.basename(path)
            return name != "skipme" and not fnmatch.fnmatch(name, "*.pyc")

    dest = tmp_path / "dest"
    rs = Filtered(tree)
    rs.add_target(gw1, str(dest))
    rs.send()
    assert not (dest / "skipme").exists()
    assert not (dest / "a" / "mid.pyc").exists()
    assert (dest / "keep.pyc.txt").read_bytes() == b"kept"
    assert (dest / "a" / "mid.py").exists()
    # filter() sees local paths below the source; a refused dir is not entered
    assert all(p.startswith(str(tree) + os.sep) for p in asked)
    assert str(tree / "skipme") in asked
    assert not any("inner" in p for p in asked)
    # with delete=True, what the filter refuses goes away on the remote too
    write(dest / "other.pyc", b"stale")
    rs = Filtered(tree)
    rs.add_target(gw1, str(dest), delete=True)
    rs.send()
    assert not (dest / "other.pyc").exists()
    assert rs.reported == []


def test_symlinks(tmp_path, gw1):
    src = tmp_path / "source"
    outside = write(tmp_path / "outside.txt", b"outside")
    write(src / "file.txt", b"content")
    write(src / "sub" / "inner.txt", b"inner")
    os.symlink("file.txt", src / "rel_link")
    os.symlink(str(src / "sub" / "inner.txt"), src / "abs_inside")
    os.symlink(str(src / "file.txt"), src / "sub" / "abs_inside_up")
    os.symlink(str(src), src / "sub" / "abs_root")
    os.symlink(str(outside), src / "abs_outside")
    os.symlink("../outside.txt", src / "rel_outside")
    os.symlink("does-not-exist", src / "dangling")
    os.symlink("sub", src / "dirlink")
    dest = tmp_path / "dest"
    sent = sync(src, gw1, dest)
    assert sent == ["file.txt", "sub/inner.txt"]  # links are not sent as files
    assert os.readlink(dest / "rel_link") == "file.txt"
    assert os.readlink(dest / "abs_inside") == os.path.join("sub", "inner.txt")
    assert os.readlink(dest / "sub" / "abs_inside_up") == os.path.join("..", "file.txt")
    assert os.readlink(dest / "sub" / "abs_root") == ".."
    assert os.readlink(dest / "abs_outside") == str(outside)
    assert os.readlink(dest / "rel_outside") == "../outside.txt"
    assert os.readlink(dest / "dangling") == "does-not-exist"
    assert os.readlink(dest / "dirlink") == "sub"
    assert (dest / "abs_inside").read_bytes() == b"inner"
    assert (dest / "sub" / "abs_inside_up").read_bytes() == b"content"
    # the link is retargeted when the source link changes
    os.unlink(src / "rel_link")
    os.symlink("sub/inner.txt", src / "rel_link")
    assert sync(src, gw1, dest) == []
    assert os.readlink(dest / "rel_link") == "sub/inner.txt"


def test_type_changes(tmp_path, gw1):
    src = tmp_path / "source"
    write(src / "thing" / "x.txt", b"x")
    write(src / "other", b"plain file")
    dest = tmp_path / "dest"
    sync(src, gw1, dest)
    # directory -> file, file -> directory, file -> link
    (src / "thing" / "x.txt").unlink()
    (src / "thing").rmdir()
    write(src / "thing", b"now a file")
    (src / "other").unlink()
    write(src / "other" / "y.txt", b"y")
    write(src / "target.txt", b"t")
    write(dest / "will_be_link", b"file first")
    os.symlink("target.txt", src / "will_be_link")
    assert sync(src, gw1, dest) == ["other/y.txt", "target.txt", "thing"]
    assert snapshot(dest) == snapshot(src)


def test_executable_bit_and_modes(tmp_path, gw1):
    src = tmp_path / "source"
    script = write(src / "run.sh", b"#!/bin/sh\necho hi\n")
    plain = write(src / "data.txt", b"data")
    readonly = write(src / "ro.txt", b"read only")
    os.chmod(script, 0o755)
    os.chmod(plain, 0o640)
    os.chmod(readonly, 0o444)
    dest = tmp_path / "dest"
    sync(src, gw1, dest)
    assert stat.S_IMODE(os.stat(dest / "run.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "data.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(dest / "ro.txt").st_mode) == 0o444
    assert os.access(dest / "run.sh", os.X_OK)
    # a mode change alone is applied without sending the file
    os.chmod(script, 0o644)
    os.chmod(plain, 0o750)
    assert sync(src, gw1, dest) == []
    assert stat.S_IMODE(os.stat(dest / "run.sh").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dest / "data.txt").st_mode) == 0o750
    # a read-only destination file is still replaced
    os.chmod(readonly, 0o644)
    readonly.write_bytes(b"changed, longer")
    os.chmod(readonly, 0o444)
    assert sync(src, gw1, dest) == ["ro.txt"]
    assert (dest / "ro.txt").read_bytes() == b"changed, longer"


def test_two_targets_at_once(tree, tmp_path, gw1, gw2):
    dest1, dest2, dest3 = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    write(dest2 / "extra", b"extra")
    finished = []
    rs = Recording(tree)
    rs.add_target(gw1, str(dest1), finishedcallback=lambda: finished.append("d1"))
    rs.add_target(gw2, str(dest2), finishedcallback=lambda: finished.append("d2"),
                  delete=True)
    rs.add_target(gw2, dest3)  # a path-like destdir
    rs.send()
    assert sorted(finished) == ["d1", "d2"]
    for dest in (dest1, dest2, dest3):
        assert snapshot(dest) == snapshot(tree)
    per_gw = {}
    for gwid, rel in rs.reported:
        per_gw.setdefault(gwid, []).append(rel)
    assert sorted(per_gw[gw1.id]) == ALL_FILES
    assert sorted(per_gw[gw2.id]) == sorted(ALL_FILES * 2)
    channels = {id(ch) for _, _, ch in rs.called}
    assert len(channels) == 3
    assert [kind for kind, _, _ in rs.called].count("list") == 3


def test_no_targets(tree):
    rs = execnet.RSync(tree)
    with pytest.raises(IOError, match="no targets"):
        rs.send()
    with pytest.raises(OSError):
        rs.send(raises=True)
    assert rs.send(raises=False) is None


def test_targets_are_used_up(tree, tmp_path, gw1):
    rs = Recording(tree)
    rs.add_target(gw1, str(tmp_path / "dest"))
    rs.send()
    with pytest.raises(OSError):
        rs.send()
    rs.add_target(gw1, str(tmp_path / "dest"))
    rs.send()
    assert len(rs.reported) == len(ALL_FILES)


def test_verbose_default_report(tmp_path, gw1, capsys):
    src = tmp_path / "source"
    write(src / "one.txt", b"1")
    rs = execnet.RSync(src)
    rs.add_target(gw1, str(tmp_path / "dest"))
    rs.send()
    out = capsys.readouterr().out
    # stock's format: the gateway's repr, " <= ", the path below the source
    assert re.fullmatch(r"<Gateway id='%s' [^<>]*> <= one\.txt\n" % gw1.id, out), out
    rs = execnet.RSync(src, verbose=False)
    write(src / "two.txt", b"2")
    rs.add_target(gw1, str(tmp_path / "dest"))
    rs.send()
    assert capsys.readouterr().out == ""
    assert (tmp_path / "dest" / "two.txt").read_bytes() == b"2"


class Events(execnet.RSync):
    """Records report hooks, callback calls and finishedcallbacks in order."""

    def __init__(self, sourcedir, events, **kw):
        kw.setdefault("verbose", False)
        super().__init__(sourcedir, callback=self._cb, **kw)
        self.events = events

    def _cb(self, kind, size, channel):
        self.events.append((kind, size, channel))

    def _report_send_file(self, gateway, modified_rel_path):
        self.events.append(("report", gateway, modified_rel_path))
        super()._report_send_file(gateway, modified_rel_path)


@pytest.fixture
def small_tree(tmp_path):
    # distinct sizes, so that an "ack" names its file
    src = tmp_path / "source"
    write(src / "a.txt", b"a" * 3)
    write(src / "b.txt", b"b" * 5)
    write(src / "sub" / "c.txt", b"c" * 10)
    write(src / "zero")
    os.symlink("a.txt", src / "link")
    (src / "emptydir").mkdir()
    return src


SMALL_SIZES = {"a.txt": 3, "b.txt": 5, "sub/c.txt": 10, "zero": 0}


def expected_events(gateway, channel, reported, acked, finished="fin"):
    """Stock's sequence for one target: every file to send is reported,
    then ("list", total), then an "ack" for each file in the same order,
    then the finishedcallback."""
    return ([("report", gateway, rel) for rel in reported]
            + [("list", sum(SMALL_SIZES[rel] for rel in acked), channel)]
            + [("ack", SMALL_SIZES[rel], channel) for rel in acked]
            + [finished])


def test_callback_sequence_one_target(small_tree, tmp_path, gw1, capsys):
    events = []
    rs = Events(small_tree, events, verbose=True)
    rs.add_target(gw1, tmp_path / "dest", finishedcallback=lambda *a: events.append("fin"))
    rs.send()
    reported = [e[2] for e in events if e[0] == "report"]
    assert sorted(reported) == sorted(SMALL_SIZES)  # no links, no directories
    channel = events[len(reported)][2]
    assert isinstance(channel, execnet.Channel)
    assert events == expected_events(gw1, channel, reported, reported)
    # verbose: "<gateway repr> <= relpath", one line a file, in that order
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" <= ", 1)[1] for line in lines] == reported
    for line in lines:
        assert re.fullmatch(r"<Gateway id='%s' receive-live, \w+ model, "
                            r"\d+ active channels> <= \S+" % gw1.id, line), line

    # nothing changed: no report, no callback call, but finished
    del events[:]
    rs = Events(small_tree, events)
    rs.add_target(gw1, tmp_path / "dest", finishedcallback=lambda: events.append("fin"))
    rs.send()
    assert events == ["fin"]

    # only deletions (delete=True): the same
    (small_tree / "b.txt").unlink()
    del events[:]
    rs = Events(small_tree, events)
    rs.add_target(gw1, tmp_path / "dest", finishedcallback=lambda: events.append("fin"),
                  delete=True)
    rs.send()
    assert events == ["fin"]
    assert not (tmp_path / "dest" / "b.txt").exists()


def test_callback_sequence_changed_files(small_tree, tmp_path, gw1):
    dest = tmp_path / "dest"
    sync(small_tree, gw1, dest)
    # sub/c.txt: same content, other mtime -- listed and acked like stock
    # does, though ours only sets its mtime and does not report it;
    # a.txt: same size, other content; zero: removed on the remote
    st = os.stat(small_tree / "sub" / "c.txt")
    os.utime(small_tree / "sub" / "c.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    st = os.stat(small_tree / "a.txt")
    (small_tree / "a.txt").write_bytes(b"AAA")
    os.utime(small_tree / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    (dest / "zero").unlink()
    events = []
    rs = Events(small_tree, events)
    rs.add_target(gw1, dest, finishedcallback=lambda: events.append("fin"))
    rs.send()
    reported = [e[2] for e in events if e[0] == "report"]
    assert sorted(reported) == ["a.txt", "zero"]
    channel = events[len(reported)][2]
    acks = [e[1] for e in events if e[0] == "ack"]
    assert sorted(acks) == [0, 3, 10]  # zero, a.txt, sub/c.txt
    assert events[:len(reported)] == [("report", gw1, rel) for rel in reported]
    assert events[len(reported)] == ("list", 13, channel)
    assert events[len(reported) + 1:] == [("ack", n, channel) for n in acks] + ["fin"]
    assert snapshot(dest) == snapshot(small_tree)


def test_callback_sequence_two_targets(small_tree, tmp_path, gw1, gw2):
    events = []
    rs = Events(small_tree, events)
    rs.add_target(gw1, tmp_path / "d1", finishedcallback=lambda: events.append("fin1"))
    rs.add_target(gw2, tmp_path / "d2", finishedcallback=lambda: events.append("fin2"),
                  delete=True)
    rs.send()
    lists = [e for e in events if e[0] == "list"]
    assert len(lists) == 2 and lists[0][2] is not lists[1][2]
    for gw, fin in [(gw1, "fin1"), (gw2, "fin2")]:
        # one target's events keep stock's order; the targets interleave
        mine = [e for e in events if e == fin or (e[0] == "report" and e[1] is gw)
                or (e[0] in ("list", "ack") and e[2].gateway is gw)]
        reported = [e[2] for e in mine if e[0] == "report"]
        assert sorted(reported) == sorted(SMALL_SIZES)
        channel = mine[len(reported)][2]
        assert mine == expected_events(gw, channel, reported, reported, fin)
    for dest in ("d1", "d2"):
        assert snapshot(tmp_path / dest) == snapshot(small_tree)


def test_raising_callback_does_not_stop_the_transfer(small_tree, tmp_path, gw1):
    # as stock: the files arrive, send() raises, no finishedcallback
    calls = []

    def callback(kind, size, channel):
        calls.append(kind)
        if len(calls) == 2:
            raise ValueError("second call")

    rs = execnet.RSync(small_tree, callback=callback, verbose=False)
    rs.add_target(gw1, tmp_path / "dest", finishedcallback=lambda: calls.append("fin"))
    with pytest.raises(ValueError, match="second call"):
        rs.send()
    assert calls == ["list", "ack"]
    assert snapshot(tmp_path / "dest") == snapshot(small_tree)
    assert gw1.remote_exec("channel.send(3)").receive(TIMEOUT) == 3


def test_callback_large_file_and_single_file_source(tmp_path, gw1, capsys):
    big = write(tmp_path / "big.bin", os.urandom(2 * rsync_module.CHUNK + 3))
    events = []
    rs = Events(big, events, verbose=True)
    rs.add_target(gw1, tmp_path / "copy.bin", finishedcallback=lambda: events.append("fin"))
    rs.send()
    channel = events[1][2]
    size = 2 * rsync_module.CHUNK + 3
    assert events == [("report", gw1, ""), ("list", size, channel),
                      ("ack", size, channel), "fin"]
    # stock prints the empty path of a single-file source as it is
    assert re.fullmatch(r"<Gateway id='%s' [^<>]*> <= \n" % gw1.id,
                        capsys.readouterr().out)
    assert (tmp_path / "copy.bin").read_bytes() == big.read_bytes()


def test_single_file_source(tmp_path, gw1):
    src = write(tmp_path / "lonely.txt", b"just me")
    os.chmod(src, 0o700)
    dest = tmp_path / "out" / "copy.txt"
    assert sync(src, gw1, dest) == [""]  # as stock: reported as ""
    assert dest.read_bytes() == b"just me"
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o700
    assert sync(src, gw1, dest) == []
    # into an existing directory: under the file's own name
    into = tmp_path / "into"
    write(into / "neighbour", b"stays")
    assert sync(src, gw1, into, delete=True) == [""]
    assert (into / "lonely.txt").read_bytes() == b"just me"
    assert (into / "neighbour").read_bytes() == b"stays"


def test_destination_that_is_a_file_is_not_replaced(tree, tmp_path, gw1):
    dest = write(tmp_path / "dest", b"precious")
    rs = Recording(tree)
    rs.add_target(gw1, str(dest), delete=True)
    with pytest.raises(execnet.RemoteError, match="not a directory"):
        rs.send()
    assert dest.read_bytes() == b"precious"


def test_small_chunks_and_window(tmp_path, gw1, monkeypatch):
    # many chunks per file and a tight window exercise the flow control
    monkeypatch.setattr(rsync_module, "CHUNK", 1000)
    monkeypatch.setattr(rsync_module, "WINDOW", 3000)
    monkeypatch.setattr(rsync_module, "ACK_EVERY", 1500)
    monkeypatch.setattr(rsync_module, "FILE_COST", 100)
    src = tmp_path / "source"
    write(src / "exact", b"e" * 1000)
    write(src / "medium", os.urandom(123457))
    for i in range(50):
        write(src / "many" / ("f%02d" % i), b"%d" % i * i)
    dest = tmp_path / "dest"
    rs = Recording(src)
    rs.add_target(gw1, str(dest))
    rs.send()
    assert snapshot(dest) == snapshot(src)
    assert len(rs.reported) == 52
    # the per-file acks and the byte window share the remote's acks
    assert [kind for kind, _, _ in rs.called] == ["list"] + ["ack"] * 52
    assert rs.called[0][1] == 1000 + 123457 + sum(len(b"%d" % i * i) for i in range(50))


def test_remote_failure_raises_and_other_targets_complete(tree, tmp_path, gw1, gw2):
    blocker = write(tmp_path / "blocker", b"a file, not a directory")
    good = tmp_path / "good"
    rs = Recording(tree)
    rs.add_target(gw1, str(blocker / "sub"))
    rs.add_target(gw2, str(good))
    with pytest.raises(execnet.RemoteError):
        rs.send()
    assert snapshot(good) == snapshot(tree)
    # both gateways still work
    for gw in (gw1, gw2):
        assert gw.remote_exec("channel.send(42)").receive(TIMEOUT) == 42


def test_failing_report_hook(tree, tmp_path, gw1):
    class Failing(execnet.RSync):
        def _report_send_file(self, gateway, modified_rel_path):
            raise RuntimeError("hook failed")

    rs = Failing(tree)
    rs.add_target(gw1, str(tmp_path / "dest"))
    with pytest.raises(RuntimeError, match="hook failed"):
        rs.send()
    assert gw1.remote_exec("channel.send(1)").receive(TIMEOUT) == 1
    # no temporary files are left behind
    assert _leftovers(tmp_path / "dest") == []


def _leftovers(path):
    return [n for _, _, names in os.walk(path) for n in names if n.endswith(".tmp")]


def test_interrupted_transfer_cleans_up(tmp_path, gw1):
    # the master gives up in the middle of a large file: the remote drops
    # its temporary file once it sees the channel closed
    src = tmp_path / "source"
    write(src / "huge", os.urandom(6 * 1024 * 1024))
    dest = tmp_path / "dest"

    class Interrupting(execnet.RSync):
        def _pump(self, t):
            if t.current is not None:
                raise KeyboardInterrupt
            super()._pump(t)

    rs = Interrupting(src, verbose=False)
    rs.add_target(gw1, str(dest))
    with pytest.raises(KeyboardInterrupt):
        rs.send()
    deadline = time.time() + TIMEOUT
    while _leftovers(dest) and time.time() < deadline:
        time.sleep(0.05)
    assert _leftovers(dest) == []
    assert not (dest / "huge").exists()
    assert gw1.remote_exec("channel.send(1)").receive(TIMEOUT) == 1


def test_missing_source(tmp_path, gw1):
    rs = execnet.RSync(tmp_path / "nothing-here")
    rs.add_target(gw1, str(tmp_path / "dest"))
    with pytest.raises(OSError):
        rs.send()
    assert not (tmp_path / "dest").exists()


def test_relative_destdir_and_main_thread_only(tree, tmp_path):
    group = execnet.Group()
    try:
        gw = group.makegateway(
            "execmodel=main_thread_only//popen//chdir=%s" % (tmp_path,))
        rs = Recording(tree)
        rs.add_target(gw, "relative/dest")
        rs.send()
        assert snapshot(tmp_path / "relative" / "dest") == snapshot(tree)
        assert gw.remote_exec("channel.send(7)").receive(TIMEOUT) == 7
    finally:
        group.terminate(timeout=TIMEOUT)


def test_remote_module_is_self_contained():
    with open(rsync_remote.__file__) as f:
        source = f.read()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in rsync_remote"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names), imported


def test_zero_install_remote(tree, tmp_path, monkeypatch):
    fake = tmp_path / "fakepkg" / "execnet"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not this one')\n")
    from execnet import gateway_bootstrap

    monkeypatch.setattr(gateway_bootstrap, "PKGDIR", str(tmp_path / "fakepkg"))
    group = execnet.Group()
    try:
        gw = group.makegateway("popen")
        ch = gw.remote_exec("""
            import sys
            channel.send(sorted(n for n in sys.modules if n.startswith("execnet")))
        """)
        assert ch.receive(TIMEOUT) == ["execnet_gateway_base"]
        dest = tmp_path / "dest"
        assert sync(tree, gw, dest) == ALL_FILES
        assert sync(tree, gw, dest) == []
        assert snapshot(dest) == snapshot(tree)
    finally:
        group.terminate(timeout=TIMEOUT)


def test_other_python_remote(tmp_path, otherpython):
    src = tmp_path / "source"
    write(src / "x" / "y.txt", b"y" * 3000)
    os.symlink("x/y.txt", src / "link")
    os.chmod(src / "x" / "y.txt", 0o751)
    group = execnet.Group()
    try:
        gw = group.makegateway("popen//python=%s" % otherpython)
        dest = tmp_path / "dest"
        assert sync(src, gw, dest, delete=True) == ["x/y.txt"]
        assert snapshot(dest) == snapshot(src)
        assert sync(src, gw, dest, delete=True) == []
    finally:
        group.terminate(timeout=TIMEOUT)


class HostRSyncLike(execnet.RSync):
    """What pytest-xdist's HostRSync does with the API."""

    def __init__(self, sourcedir, *, ignores=None, verbose=True):
        self._ignores = [re.compile(fnmatch.translate(os.fspath(x)))
                         for x in ignores or []]
        super().__init__(sourcedir=sourcedir, verbose=verbose)

    def filter(self, path):
        from pathlib import Path

        path = Path(path)
        for cre in self._ignores:
            if cre.match(path.name) or cre.match(str(path)):
                return False
        return True

    def add_target_host(self, gateway, finished=None):
        remotepath = os.path.basename(self._sourcedir)
        super().add_target(gateway, remotepath, finishedcallback=finished, delete=True)

    def _report_send_file(self, gateway, modified_rel_path):
        if self._verbose > 0:
            path = os.path.basename(self._sourcedir) + "/" + modified_rel_path
            remotepath = gateway.spec.chdir
            print("%s:%s <= %s" % (gateway.spec, remotepath, path))


def test_xdist_like_subclass(tmp_path, capsys):
    from pathlib import Path

    src = tmp_path / "proj"
    write(src / "pkg" / "__init__.py", b"")
    write(src / "pkg" / "mod.py", b"A = 1\n")
    write(src / "pkg" / "mod.pyc", b"junk")
    write(src / ".hidden", b"secret")
    write(src / "notes.txt~", b"backup")
    workdir = tmp_path / "remote_cwd"
    workdir.mkdir()
    write(workdir / "proj" / "stale.py", b"old")
    group = execnet.Group()
    try:
        gw = group.makegateway(
            "execmodel=main_thread_only//popen//chdir=%s" % (workdir,))
        done = []
        rs = HostRSyncLike(Path(src), verbose=True,
                           ignores=[".*", "*.pyc", "*.pyo", "*~"])
        rs.add_target_host(gw, finished=lambda: done.append(True))
        rs.send()
        assert done == [True]
        out = capsys.readouterr().out
        assert "<= proj/pkg/mod.py" in out
        assert "<= proj/pkg/__init__.py" in out
        assert str(workdir) in out
        assert snapshot(workdir / "proj") == {
            "pkg": ("d",),
            "pkg/__init__.py": ("f", b"", 0o666 & ~_umask()),
            "pkg/mod.py": ("f", b"A = 1\n", 0o666 & ~_umask()),
        }
        rs = HostRSyncLike(src, verbose=False, ignores=[".*"])
        rs.add_target_host(gw)
        rs.send()
        assert capsys.readouterr().out == ""
    finally:
        group.terminate(timeout=TIMEOUT)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pytest_xdist_rsyncdir_end_to_end(tmp_path):
    pytest.importorskip("xdist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(execnet.__file__)))
    src = tmp_path / "proj"
    payload = os.urandom(200000)
    write(src / "data" / "payload.bin", payload)
    write(src / ".hidden", b"not synced")
    write(src / "test_synced.py", textwrap.dedent("""
        import os

        def test_runs_from_the_copy():
            here = os.path.dirname(os.path.abspath(__file__))
            with open(os.path.join(here, "data", "payload.bin"), "rb") as f:
                assert len(f.read()) == 200000
            import execnet
            with open(os.path.join(here, "ran_in.txt"), "w") as f:
                f.write(here + "\\n" + os.path.abspath(execnet.__file__))
    """).encode())
    dest = tmp_path / "dest"
    dest.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    # not "-n 1": xdist then replaces the --tx specs by plain "popen" (no
    # chdir), and a plain popen worker gets sys.path instead of an rsync
    cmd = [sys.executable, "-m", "pytest", "--dist", "load", "-p", "no:cacheprovider",
           "--rsyncdir", str(src), "--tx", "popen//chdir=%s" % (dest,),
           str(src / "test_synced.py")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "1 passed" in output, output
    copy = dest / "proj"
    assert (copy / "data" / "payload.bin").read_bytes() == payload
    assert (copy / "test_synced.py").read_bytes() == (src / "test_synced.py").read_bytes()
    assert not (copy / ".hidden").exists()
    here, execnet_file = (copy / "ran_in.txt").read_text().splitlines()
    assert os.path.samefile(here, copy)
    assert execnet_file.startswith(root + os.sep), execnet_file
    # xdist also syncs pytest itself next to it
    assert (dest / "_pytest").is_dir()


@pytest.mark.parametrize("model", ["thread", "main_thread_only", "eventlet", "gevent"])
def test_execmodels(model, tmp_path):
    if model in ("eventlet", "gevent"):
        pytest.importorskip(model)
    src = tmp_path / "source"
    write(src / "a" / "b.txt", b"b" * 100)
    write(src / "big", os.urandom(3 * 1024 * 1024 + 5))
    group = execnet.Group(execmodel=model)
    try:
        gws = [group.makegateway("popen"), group.makegateway("popen")]
        rs = Recording(src)
        for i, gw in enumerate(gws):
            rs.add_target(gw, str(tmp_path / ("dest%d" % i)))
        rs.send()
        for i in range(2):
            assert snapshot(tmp_path / ("dest%d" % i)) == snapshot(src)
        assert len(rs.reported) == 4
    finally:
        group.terminate(timeout=TIMEOUT)
