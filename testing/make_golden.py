#!/usr/bin/env python3
"""Regenerate ``testing/data/golden_dumps.json`` from stock execnet.

Stock execnet is used strictly as a black box: this script installs the
released package into a throwaway virtualenv and calls only its public
``execnet.dumps`` / ``execnet.loads`` API on a fixed list of sample objects.
Nothing from execnet's source is copied here.

Each entry of the output file is a dict:

    name        unique, human readable label
    expr        Python expression that rebuilds the sample object; it must
                evaluate with ``eval(expr, {"__builtins__": builtins})``
    hex         hex of ``execnet.dumps(obj)`` as produced by stock execnet
    loads_repr  ``repr(execnet.loads(bytes.fromhex(hex)))`` under stock

or, when stock refuses the object:

    error       exception type name (e.g. "DumpError", "error")
    error_module  module of that exception type (e.g. "struct")
    message     ``str(exc)``

Usage:
    python testing/make_golden.py [--venv DIR] [--output FILE] [--version V]

The run is deterministic: the sample list is fixed and ordered, sets are
only used where their iteration order is fixed (small ints), and the JSON is
written with a stable layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path("~/.cache/execnet-stock-venv").expanduser()
DEFAULT_OUTPUT = HERE / "data" / "golden_dumps.json"
STOCK_VERSION = "2.1.2"

# (name, expr). The expression is evaluated in the stock venv with nothing
# but builtins in its namespace; anything needing a module uses __import__.
SAMPLES: list[tuple[str, str]] = [
    # --- singletons / bool ---
    ("none", "None"),
    ("true", "True"),
    ("false", "False"),
    # --- ints ---
    ("int_0", "0"),
    ("int_1", "1"),
    ("int_-1", "-1"),
    ("int_5", "5"),
    ("int_-5", "-5"),
    ("int_255", "255"),
    ("int_256", "256"),
    ("int_2**31-1", "2**31-1"),
    ("int_2**31", "2**31"),
    ("int_-2**31", "-2**31"),
    ("int_-2**31-1", "-2**31-1"),
    ("int_2**32", "2**32"),
    ("int_-2**32", "-2**32"),
    ("int_2**63-1", "2**63-1"),
    ("int_2**63", "2**63"),
    ("int_-2**63", "-2**63"),
    ("int_-2**63-1", "-2**63-1"),
    ("int_2**64", "2**64"),
    ("int_-(2**64)", "-(2**64)"),
    ("int_10**100", "10**100"),
    ("int_-(10**100)", "-(10**100)"),
    ("int_2**1000", "2**1000"),
    # --- floats ---
    ("float_0.0", "0.0"),
    ("float_-0.0", "-0.0"),
    ("float_1.5", "1.5"),
    ("float_0.1", "0.1"),
    ("float_-2.25", "-2.25"),
    ("float_inf", "float('inf')"),
    ("float_-inf", "float('-inf')"),
    ("float_nan", "float('nan')"),
    ("float_1e300", "1e300"),
    ("float_5e-324", "5e-324"),
    # --- complex ---
    ("complex_1+2j", "complex(1,2)"),
    ("complex_0", "complex(0,0)"),
    ("complex_-1.5-0.25j", "complex(-1.5,-0.25)"),
    # --- bytes ---
    ("bytes_empty", "b''"),
    ("bytes_ab", "b'ab'"),
    ("bytes_range256", "bytes(range(256))"),
    ("bytes_1000", "b'z'*1000"),
    # --- str ---
    ("str_empty", "''"),
    ("str_ascii", "'hello'"),
    ("str_he", "'h\\xe9'"),
    ("str_nihongo", "'\\u65e5\\u672c\\u8a9e'"),
    ("str_nul", "'\\x00'"),
    ("str_newline", "'a\\nb'"),
    ("str_astral", "'\\U0001f600'"),
    ("str_lone_surrogate", "'\\ud800'"),
    ("str_1000_ascii", "'x'*1000"),
    ("str_1000_nonascii", "'\\xe9'*1000"),
    ("str_1000_mixed", "'ab\\u65e5'*333+'z'"),
    # --- lists ---
    ("list_empty", "[]"),
    ("list_7_8", "[7, 8]"),
    ("list_nested", "[[1],[2,[3]]]"),
    ("list_mixed", "[None, 1, 'a', b'b', 1.5, (2,), {3: 4}]"),
    ("list_bools", "[True, False, None, 0, 1]"),
    ("list_100_ints", "list(range(100))"),
    # --- tuples ---
    ("tuple_empty", "()"),
    ("tuple_7_a", "(7,'a')"),
    ("tuple_nested", "((1,),)"),
    ("tuple_bools", "(True, 1, False, 0)"),
    # --- dicts ---
    ("dict_empty", "{}"),
    ("dict_1_2", "{1: 2}"),
    ("dict_nested", "{'a': [1, (2, 3)], 'b': {'c': None}}"),
    ("dict_tuple_key", "{(1, 2): 'x', 'y': (3,)}"),
    ("dict_bool_values", "{'flag': True, 'other': False, 'n': None}"),
    ("dict_bool_key", "{True: 'yes', None: 'none'}"),
    ("dict_insertion_order", "{'z': 1, 'a': 2, 'm': 3}"),
    # --- sets (small ints only: deterministic iteration order) ---
    ("set_empty", "set()"),
    ("set_3", "{3}"),
    ("set_1_2_3", "{1, 2, 3}"),
    ("frozenset_empty", "frozenset()"),
    ("frozenset_1", "frozenset([1])"),
    ("frozenset_1_2", "frozenset([1, 2])"),
    ("set_in_list", "[{1}, frozenset([2])]"),
    # --- a pytest-xdist style serialized test report ---
    (
        "xdist_report",
        "{'nodeid': 'tests/test_mod.py::TestX::test_a[1-2]',"
        " 'location': ('tests/test_mod.py', 41, 'TestX.test_a[1-2]'),"
        " 'keywords': {'test_a[1-2]': 1, 'TestX': 1, 'parametrize': 1,"
        " 'test_mod.py': 1, 'tests': 1},"
        " 'outcome': 'passed',"
        " 'longrepr': None,"
        " 'when': 'call',"
        " 'user_properties': [],"
        " 'sections': [('Captured stdout call', 'hello\\n'),"
        " ('Captured log call', 'INFO  x:y.py:3 msg\\n')],"
        " 'duration': 0.0012345678,"
        " 'start': 1700000000.25,"
        " 'stop': 1700000000.2512345,"
        " '$report_type': 'TestReport',"
        " 'item_index': 3,"
        " 'worker_id': 'gw0',"
        " 'testrun_uid': 'f0e1d2c3b4a5',"
        " 'skipped': False,"
        " 'failed': False}"
    ),
    (
        "xdist_failed_report",
        "{'nodeid': 'test_x.py::test_b', 'location': ('test_x.py', 9, 'test_b'),"
        " 'keywords': {'test_b': 1}, 'outcome': 'failed',"
        " 'longrepr': {'reprcrash': {'path': '/t/test_x.py', 'lineno': 10,"
        " 'message': 'assert 1 == 2'}, 'reprtraceback': {'reprentries':"
        " [{'type': 'ReprEntry', 'data': {'lines': ['>   assert 1 == 2',"
        " 'E   assert 1 == 2'], 'reprfuncargs': {'args': []},"
        " 'reprlocals': None, 'reprfileloc': {'path': 'test_x.py',"
        " 'lineno': 10, 'message': 'AssertionError'}, 'style': 'long'}}],"
        " 'extraline': None, 'style': 'long'}, 'sections': [],"
        " 'chain': [[{'reprentries': []}, {'path': '/t/test_x.py',"
        " 'lineno': 10, 'message': 'assert 1 == 2'}, None]]},"
        " 'when': 'call', 'duration': 1.5e-05, 'sections': []}"
    ),
    # --- types stock refuses ---
    ("reject_object", "object()"),
    ("reject_class", "type('C', (), {})"),
    ("reject_builtin_type", "int"),
    ("reject_function", "len"),
    ("reject_intenum", "__import__('enum').IntEnum('Color', 'RED GREEN').RED"),
    ("reject_ordereddict", "__import__('collections').OrderedDict([(1, 2)])"),
    ("reject_defaultdict", "__import__('collections').defaultdict(int)"),
    ("reject_str_subclass", "type('S', (str,), {})('x')"),
    ("reject_int_subclass", "type('I', (int,), {})(3)"),
    ("reject_list_subclass", "type('L', (list,), {})([1])"),
    ("reject_bytearray", "bytearray(b'ab')"),
    ("reject_memoryview", "memoryview(b'ab')"),
    ("reject_range", "range(3)"),
    ("reject_ellipsis", "Ellipsis"),
    ("reject_decimal", "__import__('decimal').Decimal('1.5')"),
    ("reject_nested_in_list", "[1, object()]"),
    ("reject_nested_in_dict_value", "{'a': bytearray(b'x')}"),
]

# Runs inside the stock venv's interpreter (isolated mode, neutral cwd), reads
# the sample list as JSON on stdin and prints results as JSON on stdout.
CHILD = r'''
import builtins, json, sys
import execnet

want = sys.argv[1]
if execnet.__version__ != want:
    sys.exit("stock execnet version is %s, wanted %s" % (execnet.__version__, want))
samples = json.load(sys.stdin)
out = []
for name, expr in samples:
    obj = eval(expr, {"__builtins__": builtins})
    entry = {"name": name, "expr": expr}
    try:
        data = execnet.dumps(obj)
    except Exception as exc:
        entry["error"] = type(exc).__name__
        entry["error_module"] = type(exc).__module__
        entry["message"] = str(exc)
    else:
        entry["hex"] = data.hex()
        try:
            entry["loads_repr"] = repr(execnet.loads(data))
        except Exception as exc:
            entry["loads_error"] = "%s: %s" % (type(exc).__name__, exc)
    out.append(entry)
json.dump({"version": execnet.__version__, "entries": out}, sys.stdout)
'''


def venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def stock_version(py: Path) -> str | None:
    if not py.exists():
        return None
    res = subprocess.run(
        [str(py), "-I", "-c", "import execnet; print(execnet.__version__)"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    return res.stdout.strip() if res.returncode == 0 else None


def ensure_venv(venv: Path, version: str) -> Path:
    py = venv_python(venv)
    if not py.exists():
        print(f"creating venv {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if stock_version(py) != version:
        print(f"installing execnet=={version} into {venv}", file=sys.stderr)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"execnet=={version}"],
            check=True,
            cwd=tempfile.gettempdir(),
        )
    got = stock_version(py)
    if got != version:
        raise SystemExit(f"could not get execnet {version} into {venv} (got {got})")
    return py


def run_samples(py: Path, version: str) -> dict:
    names = [n for n, _ in SAMPLES]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"duplicate sample names: {sorted(dupes)}")
    # -I: ignore PYTHONPATH/user site and do not put cwd on sys.path, so a
    # checkout's own ``execnet`` directory can never shadow the stock one.
    res = subprocess.run(
        [str(py), "-I", "-c", CHILD, version],
        input=json.dumps(SAMPLES),
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"stock run failed with exit code {res.returncode}")
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                    help=f"throwaway virtualenv (default {DEFAULT_VENV})")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                    help="where to write the golden JSON")
    ap.add_argument("--version", default=STOCK_VERSION,
                    help=f"stock execnet version (default {STOCK_VERSION})")
    args = ap.parse_args(argv)

    py = ensure_venv(args.venv.expanduser(), args.version)
    result = run_samples(py, args.version)
    entries = result["entries"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(entries, indent=1, ensure_ascii=True) + "\n"
    args.output.write_text(text, encoding="ascii")
    nerr = sum(1 for e in entries if "error" in e)
    print(f"wrote {len(entries)} entries ({nerr} refused by stock "
          f"execnet {result['version']}) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
