"""RSync: mirror a local directory tree into directories behind gateways.

::

    rsync = execnet.RSync("/src/project")
    rsync.add_target(gw1, "project")              # relative to gw1's cwd
    rsync.add_target(gw2, "/tmp/project", delete=True)
    rsync.send()

How it works (the receiving half is ``execnet/rsync_remote.py``, which is
sent as source, so the remote needs only the standard library):

* ``send()`` walks the source once, asking :meth:`RSync.filter` about every
  path (a directory refused is not entered), and builds a manifest: the
  directories, the regular files with size, mtime (ns) and permission bits,
  and the symbolic links with their targets.
* One channel per target gets the manifest.  The remote creates
  directories and links, replaces entries whose type changed, chmods files
  that are up to date but differ in mode, removes everything the manifest
  does not list when ``delete=True``, and answers with the files it lacks
  or whose size differs plus a SHA-256 of every file whose size matches but
  whose mtime does not.
* The master compares those digests with its own (computed once per file
  for all targets): equal files only get their mtime and mode set, the rest
  are reported (:meth:`_report_send_file`, all of a target's at once) and
  streamed -- a small file in one message, a large one in 1 MiB chunks,
  written to a temporary file and renamed into place with the source's
  mtime and permission bits.  At most a few MiB per target are in flight
  unacknowledged, so memory stays bounded for any file size.
* All targets are served at once from a single loop in the calling thread:
  a slow target does not hold up the others, and :meth:`_report_send_file`,
  ``callback`` and ``finishedcallback`` run in the thread that called
  ``send()``.

``callback(kind, size, channel)`` sees each target's progress as stock
execnet reports it: once ``("list", total, channel)`` with the summed
sizes of the files the remote asked for (missing, other size or other
mtime -- also those that then only get their mtime set), then
``("ack", size, channel)`` for each of them as the remote has it in place,
in the order of the list.  A target that needs no file gets no call.
``finishedcallback()`` follows the last ``ack``.

Symbolic links are recreated as links, never followed.  A relative target
is kept as it is; an absolute target inside the source tree is rewritten
relative to the link, so it points into the copy; an absolute target
outside the tree is kept as it is (it may dangle on the remote side).
Special files (fifos, sockets, devices) are skipped.  Directory permission
bits are not copied.  With ``delete=True`` the destination becomes a mirror
of the *filtered* source: entries that :meth:`filter` rejected are removed
there too.

Targets are used up by ``send()``; add them again for another round.  A
destination that exists but is not a directory is an error (reported by
``send()``), it is not replaced.  A source that is a single regular file is
copied to ``destdir`` -- into it, under the file's name, if ``destdir`` is
an existing directory.
"""
import hashlib
import os
import stat
from collections import deque

CHUNK = 1024 * 1024       # bytes per data message
WINDOW = 4 * CHUNK        # unacknowledged cost allowed per target
FILE_COST = 4096          # what one file header counts for flow control
ACK_EVERY = CHUNK         # the remote acknowledges at least this often

_CLOSED = object()        # endmarker of a target's channel


class _Target:
    def __init__(self, gateway, destdir, finishedcallback, options):
        self.gateway = gateway
        self.destdir = destdir
        self.finishedcallback = finishedcallback
        self.options = options
        self.channel = None
        self.todo = deque()   # (rel, send?) in the order of the manifest
        self.pending = deque()  # [size, aborted] of files not yet acked
        self.current = None   # (fileobject, rel, stat, pending entry)
        self.inflight = 0
        self.planned = False
        self.done_sent = False
        self.finished = None  # the remote's stats once it reported
        self.error = None
        self.callback_error = None  # what ``callback`` raised, if it did
        self.ended = False    # its channel is closed (either side)

    def close_current(self):
        if self.current is not None:
            try:
                self.current[0].close()
            finally:
                self.current = None


class RSync:
    """Mirror the directory ``sourcedir`` to one or more gateways.

    ``callback(kind, size, channel)`` follows each target's progress:
    ``("list", total_size, channel)`` once the remote has said which files
    it wants, then ``("ack", file_size, channel)`` for each of those files
    as the remote has it in place.  ``verbose`` makes
    :meth:`_report_send_file` print each file sent.
    """

    def __init__(self, sourcedir, callback=None, verbose=True):
        self._sourcedir = str(os.fspath(sourcedir))
        self._callback = callback
        self._verbose = verbose
        self._targets = []

    def filter(self, path):
        """Return False to leave ``path`` (a local path below the source
        directory; a directory with everything in it) out.  Override it."""
        return True

    def add_target(self, gateway, destdir, finishedcallback=None, **options):
        """Have ``send()`` mirror the source into ``destdir`` on ``gateway``
        (a relative ``destdir`` is taken from the remote's working
        directory).  ``finishedcallback()`` is called once that target is
        complete.  Options: ``delete=True`` removes what the source lacks;
        other options are accepted and ignored."""
        self._targets.append(
            _Target(gateway, str(os.fspath(destdir)), finishedcallback, options))

    def _report_send_file(self, gateway, modified_rel_path):
        """Called for each file sent to ``gateway`` (its path relative to
        the source, "" for a single-file source); prints when verbose."""
        if self._verbose:
            print("%s <= %s" % (gateway, modified_rel_path))

    def send(self, raises=True):
        """Mirror the source to all targets added since the last send and
        wait until they are complete.  Without targets: raise OSError, or
        return None when ``raises`` is false.  A target that fails raises
        its error after the other targets are done."""
        if not self._targets:
            if raises:
                raise OSError("no targets available")
            return None
        targets, self._targets = self._targets, []
        root, entries = self._manifest()
        self._order = {e[1]: i for i, e in enumerate(entries)}
        self._sizes = {e[1]: e[2] for e in entries if e[0] == "f"}
        self._digests = {}
        from . import rsync_remote

        try:
            queue = targets[0].gateway.execmodel.Queue()
        except AttributeError:
            import queue as queuemod

            queue = queuemod.Queue()
        started = []
        try:
            for t in targets:
                t.channel = t.gateway.remote_exec(rsync_remote)
                started.append(t)
                t.channel.setcallback(
                    lambda item, t=t: queue.put((t, item)), endmarker=_CLOSED)
                t.channel.send({
                    "version": 1, "destdir": t.destdir,
                    "delete": bool(t.options.get("delete", False)),
                    "ack_every": ACK_EVERY, "file_cost": FILE_COST,
                    "ack_files": self._callback is not None,
                    "root": root, "name": os.path.basename(self._sourcedir),
                    "entries": entries,
                })
            active = len(started)
            while active:
                t, item = queue.get()
                if t.ended:
                    continue
                if item is _CLOSED:
                    t.ended = True
                    active -= 1
                    self._closed(t)
                    continue
                try:
                    self._handle(t, item)
                except Exception as exc:
                    # our side failed for this target (e.g. its gateway went
                    # away mid-send, or a report hook raised): give up on it
                    # only.  A local close brings no endmarker.  If the
                    # remote failed first, its error is the one to report.
                    t.error = t.channel._getremoteerror() or exc
                    t.ended = True
                    active -= 1
                    t.close_current()
                    self._close_channel(t, exc)
        finally:
            for t in started:
                t.close_current()
                if not t.ended:
                    self._close_channel(t, None)
            del self._order, self._sizes, self._digests
        for t in targets:
            if t.error is not None:
                raise t.error
        return None

    # the master's half of the conversation
    def _handle(self, t, item):
        op = item[0]
        if op == "ack":
            t.inflight -= item[1]
            for _ in range(item[2]):
                size, aborted = t.pending.popleft()
                if not aborted:
                    self._notify(t, "ack", size)
            self._pump(t)
        elif op == "plan" and not t.planned:
            t.planned = True
            need, check = item[1], item[2]
            plan = [(rel, True) for rel in need]
            for rel, digest in check.items():
                plan.append((rel, self._local_digest(rel) != digest))
            plan.sort(key=lambda p: self._order[p[0]])
            # as stock: every file to send is reported, then the list
            for rel, send in plan:
                if send:
                    self._report_send_file(t.gateway, rel)
            if plan:
                self._notify(t, "list", sum(self._sizes[rel] for rel, _ in plan))
            t.todo.extend(plan)
            self._pump(t)
        elif op == "finished":
            t.finished = item[1]
        else:
            raise ValueError("unexpected rsync message from remote: %r" % (item,))

    def _closed(self, t):
        t.close_current()
        if t.error is not None:
            return
        error = t.channel._getremoteerror()
        if error is not None:
            t.error = error
        elif t.finished is None:
            t.error = OSError("rsync to %r: the channel closed before the "
                              "transfer finished" % (t.destdir,))
        elif t.callback_error is not None:
            t.error = t.callback_error
        elif t.finishedcallback is not None:
            t.finishedcallback()

    def _notify(self, t, kind, size):
        # As in stock execnet, where the files are already on their way
        # when ``callback`` runs, a callback that raises does not stop the
        # transfer: the target completes, gets no further calls and no
        # ``finishedcallback``, and ``send()`` raises the error.
        if self._callback is None or t.callback_error is not None:
            return
        try:
            self._callback(kind, size, t.channel)
        except Exception as exc:
            t.callback_error = exc

    def _close_channel(self, t, error):
        try:
            t.channel.close(error)
        except Exception:
            pass

    def _local_path(self, rel):
        if not rel:
            return self._sourcedir
        return os.path.join(self._sourcedir, *rel.split("/"))

    def _local_digest(self, rel):
        try:
            return self._digests[rel]
        except KeyError:
            pass
        h = hashlib.sha256()
        try:
            with open(self._local_path(rel), "rb") as f:
                while True:
                    block = f.read(CHUNK)
                    if not block:
                        break
                    h.update(block)
            digest = h.hexdigest()
        except OSError:
            digest = None
        self._digests[rel] = digest
        return digest

    def _pump(self, t):
        """Send to ``t`` until its window is full or nothing is left."""
        channel = t.channel
        while t.inflight < WINDOW:
            if t.current is None:
                if not t.todo:
                    if not t.done_sent:
                        t.done_sent = True
                        channel.send(("done",))
                    return
                rel, send = t.todo.popleft()
                if not send:
                    # equal content: the remote sets mtime and mode only
                    rels = [rel]
                    while t.todo and not t.todo[0][1]:
                        rels.append(t.todo.popleft()[0])
                    channel.send(("same", rels))
                    t.pending.extend([self._sizes[r], False] for r in rels)
                    t.inflight += FILE_COST * len(rels)
                    continue
                path = self._local_path(rel)
                try:
                    f = open(path, "rb")
                except OSError:
                    continue  # vanished or unreadable since the walk
                try:
                    st = os.fstat(f.fileno())
                    data = f.read(CHUNK)
                except OSError:
                    f.close()
                    continue
                mode = stat.S_IMODE(st.st_mode) & 0o777
                entry = [self._sizes[rel], False]
                if len(data) < CHUNK:
                    f.close()
                    channel.send(("whole", rel, data, st.st_mtime_ns, mode))
                else:
                    t.current = (f, rel, st, entry)
                    channel.send(("begin", rel))
                    channel.send(data)
                t.pending.append(entry)
                t.inflight += len(data) + FILE_COST
                continue
            f, rel, st, entry = t.current
            try:
                data = f.read(CHUNK)
            except OSError:
                t.close_current()
                entry[1] = True  # the remote drops it; no "ack" for it
                channel.send(("abort",))
                continue
            if data:
                channel.send(data)
                t.inflight += len(data)
            else:
                t.close_current()
                channel.send(("eof", st.st_mtime_ns, stat.S_IMODE(st.st_mode) & 0o777))

    # walking the source
    def _manifest(self):
        root = self._sourcedir
        st = os.stat(root)
        if stat.S_ISREG(st.st_mode):
            return "f", [("f", "", st.st_size, st.st_mtime_ns,
                          stat.S_IMODE(st.st_mode) & 0o777)]
        if not stat.S_ISDIR(st.st_mode):
            raise OSError("rsync source is neither a directory nor a file: %r"
                          % (root,))
        entries = []
        stack = [("", root)]
        while stack:
            prefix, dirpath = stack.pop()
            with os.scandir(dirpath) as it:
                items = sorted(it, key=lambda e: e.name)
            subdirs = []
            for item in items:
                path = item.path
                if not self.filter(path):
                    continue
                rel = prefix + item.name
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    continue  # a name that is not text can't be sent
                st = item.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    entries.append(("l", rel, self._link_target(rel, os.readlink(path))))
                elif stat.S_ISDIR(mode):
                    entries.append(("d", rel))
                    subdirs.append((rel + "/", path))
                elif stat.S_ISREG(mode):
                    entries.append(("f", rel, st.st_size, st.st_mtime_ns,
                                    stat.S_IMODE(mode) & 0o777))
            stack.extend(reversed(subdirs))
        return "d", entries

    def _link_target(self, rel, target):
        """Absolute links into the tree become relative; others stay."""
        if not os.path.isabs(target):
            return target
        norm = os.path.normpath(target)
        bases = []
        for base in (os.path.abspath(self._sourcedir),
                     os.path.realpath(self._sourcedir)):
            if base not in bases:
                bases.append(base)
        for base in bases:
            if norm == base or norm.startswith(base.rstrip(os.sep) + os.sep):
                linkdir = os.path.dirname(os.path.join(base, *rel.split("/")))
                return os.path.relpath(norm, linkdir)
        return target
