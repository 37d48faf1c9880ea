"""The receiving half of :class:`execnet.RSync`.

This file is shipped as source with ``gateway.remote_exec(module)`` and runs
in the remote interpreter with a global ``channel``.  It must stay
self-contained: standard library only, no import of ``execnet`` (the remote
may run ``gateway_base.py`` alone, zero-install), and plain Python 3 syntax
that older interpreters accept.

Protocol (all items are plain tuples/dicts/str/bytes/ints; the master is the
sending side, see ``execnet/rsync.py``)::

    master -> remote  {"version": 1, "destdir": str, "delete": bool,
                       "ack_every": int, "file_cost": int,
                       "ack_files": bool,
                       "root": "d" | "f", "name": source basename,
                       "entries": [entry, ...]}
        entry = ("d", rel)                          directory
              | ("f", rel, size, mtime_ns, mode)    regular file
              | ("l", rel, linktarget)              symbolic link
        rel is "/"-separated, relative to destdir; parents come before
        children.  A single-file source (root "f") has one entry with
        rel "" -- destdir itself, or destdir/name if that is a directory.

    remote -> master  ("plan", [rel, ...], {rel: sha256hex})
        The remote has made directories and links, fixed type clashes,
        applied permission bits of up-to-date files, and (delete=True)
        removed what the manifest does not list.  The list holds files it
        lacks or whose size differs; the dict holds a digest of every file
        whose size matches but whose mtime differs.

    master -> remote  ("same", [rel, ...])   digests matched: set mtime/mode
                      ("whole", rel, data, mtime_ns, mode)   a small file
                      ("begin", rel)  bytes  bytes ...  ("eof", mtime_ns, mode)
                      ("abort",)      the master could not finish reading
                      ("done",)
    remote -> master  ("ack", cost, nfiles)   flow control, see below
                      ("finished", stats)   then the remote code returns

Flow control: every data byte and every file header (``file_cost``; a
file of a "same" message counts as one) counts; the remote acknowledges
what it has written whenever ``ack_every`` is reached, and the master
keeps only a bounded amount unacknowledged.  ``nfiles`` is how many more
files (written, aborted or "same") are done since the last ack, in the
order the master sent them; with ``ack_files`` the remote acknowledges
after every such file, so the master can report each one promptly.
"""
import hashlib
import os
import shutil
import stat

_BLOCK = 1024 * 1024


def _local_path(destdir, rel):
    if not rel:
        return destdir
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", "..") or os.sep in part or (
                os.altsep and os.altsep in part):
            raise ValueError("bad path in manifest: %r" % (rel,))
    return os.path.join(destdir, *parts)


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path, st=None):
    if st is None:
        st = _lstat(path)
        if st is None:
            return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _same_mtime(have_ns, want_ns):
    # a file system may keep coarser times than the source: a value that is
    # the source's truncated to micro-/milli-/whole seconds counts as equal
    if have_ns == want_ns:
        return True
    for unit in (1000, 1000000, 1000000000):
        if have_ns == want_ns - want_ns % unit:
            return True
    return False


def _set_meta(path, mtime_ns, mode):
    os.chmod(path, mode)
    try:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    except OSError:
        pass  # mtimes are kept "where feasible"


class _Receiver:
    def __init__(self, channel, config):
        self.channel = channel
        self.destdir = os.path.abspath(config["destdir"])
        self.delete = bool(config.get("delete", False))
        self.ack_every = int(config.get("ack_every", _BLOCK))
        self.file_cost = int(config.get("file_cost", 0))
        self.ack_files = bool(config.get("ack_files", False))
        self.root = config.get("root", "d")
        self.name = config.get("name", "")
        self.entries = config["entries"]
        self.files = {}  # rel -> (size, mtime_ns, mode)
        self.unacked = 0
        self.unacked_files = 0
        self.tmp = None  # (fileobject, tmppath, finalpath) during "begin"
        self.stats = {"written": 0, "bytes": 0, "touched": 0, "deleted": 0}

    # phase one: compare the manifest with the destination
    def prepare(self):
        dest = self.destdir
        if self.root == "d":
            if os.path.lexists(dest) and not os.path.isdir(dest):
                raise OSError("rsync destination exists and is not a "
                              "directory: %r" % (dest,))
            if not os.path.isdir(dest):
                os.makedirs(dest)
        else:
            # a single file: into an existing directory under its own
            # name, else to the destination path itself
            if os.path.isdir(dest):
                dest = self.destdir = os.path.join(dest, self.name)
            parent = os.path.dirname(dest)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent)
        need = []
        check = {}
        kinds = {}
        for entry in self.entries:
            kind, rel = entry[0], entry[1]
            kinds[rel] = kind
            path = _local_path(dest, rel)
            st = _lstat(path)
            if kind == "d":
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    _remove(path, st)
                    st = None
                if st is None:
                    os.mkdir(path)
            elif kind == "l":
                target = entry[2]
                if st is not None:
                    if stat.S_ISLNK(st.st_mode) and os.readlink(path) == target:
                        continue
                    _remove(path, st)
                os.symlink(target, path)
            elif kind == "f":
                size, mtime_ns, mode = entry[2], entry[3], entry[4]
                self.files[rel] = (size, mtime_ns, mode)
                if st is not None and not stat.S_ISREG(st.st_mode):
                    _remove(path, st)
                    st = None
                if st is None or st.st_size != size:
                    need.append(rel)
                elif _same_mtime(st.st_mtime_ns, mtime_ns):
                    if stat.S_IMODE(st.st_mode) != mode:
                        os.chmod(path, mode)
                else:
                    check[rel] = _digest(path)
            else:
                raise ValueError("unknown manifest entry %r" % (entry,))
        if self.delete and self.root == "d":
            self.remove_extras(kinds)
        return need, check

    def remove_extras(self, kinds):
        todo = [("", self.destdir)]
        while todo:
            prefix, dirpath = todo.pop()
            with os.scandir(dirpath) as it:
                found = list(it)
            for item in found:
                rel = prefix + item.name
                kind = kinds.get(rel)
                isdir = item.is_dir(follow_symlinks=False)
                if kind is None:
                    if isdir:
                        shutil.rmtree(item.path)
                    else:
                        os.unlink(item.path)
                    self.stats["deleted"] += 1
                elif kind == "d" and isdir:
                    todo.append((rel + "/", item.path))

    # phase two: receive file data
    def account(self, cost, files=0):
        self.unacked += cost
        self.unacked_files += files
        if self.unacked >= self.ack_every or (files and self.ack_files):
            self.channel.send(("ack", self.unacked, self.unacked_files))
            self.unacked = 0
            self.unacked_files = 0

    def open_tmp(self, rel):
        path = _local_path(self.destdir, rel)
        head, tail = os.path.split(path)
        tmppath = os.path.join(head, ".%s.rsync-%d.tmp" % (tail, os.getpid()))
        return open(tmppath, "wb"), tmppath, path

    def finish_tmp(self, mtime_ns, mode):
        f, tmppath, path = self.tmp
        self.tmp = None
        f.close()
        _set_meta(tmppath, mtime_ns, mode)
        st = _lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        os.replace(tmppath, path)
        self.stats["written"] += 1

    def drop_tmp(self):
        if self.tmp is not None:
            f, tmppath, _ = self.tmp
            self.tmp = None
            f.close()
            try:
                os.unlink(tmppath)
            except OSError:
                pass

    def run(self):
        need, check = self.prepare()
        self.channel.send(("plan", need, check))
        while True:
            item = self.channel.receive()
            if isinstance(item, bytes):
                if self.tmp is None:
                    raise ValueError("file data outside of a file")
                self.tmp[0].write(item)
                self.stats["bytes"] += len(item)
                self.account(len(item))
                continue
            op = item[0]
            if op == "whole":
                rel, data, mtime_ns, mode = item[1], item[2], item[3], item[4]
                self.tmp = self.open_tmp(rel)
                self.tmp[0].write(data)
                self.stats["bytes"] += len(data)
                self.finish_tmp(mtime_ns, mode)
                self.account(len(data) + self.file_cost, 1)
            elif op == "begin":
                self.drop_tmp()
                self.tmp = self.open_tmp(item[1])
                self.account(self.file_cost)
            elif op == "eof":
                self.finish_tmp(item[1], item[2])
                self.account(0, 1)
            elif op == "abort":
                self.drop_tmp()
                self.account(0, 1)
            elif op == "same":
                for rel in item[1]:
                    size, mtime_ns, mode = self.files[rel]
                    _set_meta(_local_path(self.destdir, rel), mtime_ns, mode)
                    self.stats["touched"] += 1
                self.account(self.file_cost * len(item[1]), len(item[1]))
            elif op == "done":
                self.drop_tmp()
                self.channel.send(("finished", self.stats))
                return
            else:
                raise ValueError("unknown rsync message %r" % (op,))


def serve(channel):
    """Receive one tree into the directory the master names; see the
    module docstring for the conversation."""
    config = channel.receive()
    if not isinstance(config, dict) or config.get("version") != 1:
        raise ValueError("unsupported rsync request: %r" % (config,))
    receiver = _Receiver(channel, config)
    try:
        receiver.run()
    except EOFError:
        pass  # the master gave up (it closed the channel)
    finally:
        receiver.drop_tmp()


if __name__ == "__channelexec__":
    serve(channel)  # type: ignore[name-defined]  # noqa: F821
