"""Run the ``>>>`` examples of every page in doc/ as doctests.

One test per documentation file.  The examples create their gateways in
their own ``execnet.Group`` and terminate it; whatever a page leaves in
``execnet.default_group`` is terminated after it, so no remote interpreter
outlives its test.
"""
import doctest
import os
import pathlib

import pytest

import execnet

DOCDIR = pathlib.Path(__file__).resolve().parent.parent / "doc"
DOCFILES = sorted(DOCDIR.glob("*.rst"))
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("path", DOCFILES, ids=[p.name for p in DOCFILES])
def test_doc_examples(path, monkeypatch):
    # the examples show paths relative to nothing in particular; run them
    # from the doc directory so a stray relative path cannot hit the checkout
    monkeypatch.chdir(DOCDIR)
    try:
        result = doctest.testfile(
            str(path), module_relative=False, optionflags=OPTIONFLAGS,
            verbose=False, report=True, raise_on_error=False,
            globs={"__name__": "__doctest__"}, encoding="utf-8")
    finally:
        execnet.default_group.terminate(timeout=10)
    assert result.failed == 0, "%d of %d examples failed in %s (see output above)" % (
        result.failed, result.attempted, path.name)


def test_docs_present():
    names = {p.name for p in DOCFILES}
    assert {"index.rst", "basics.rst", "protocol.rst"} <= names, names
