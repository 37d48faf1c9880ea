"""python -m execnet [--tx SPEC]... SOURCE

Run SOURCE on each gateway (default: one ``popen``) with ``channel`` in its
namespace, and print every item the remote side sends, prefixed by the
gateway id.  Exit status 1 if a remote raised.
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m execnet",
        description="Run Python source on one or more execnet gateways and "
                    "print what each sends back over its channel.")
    parser.add_argument("--tx", action="append", metavar="SPEC",
                        help="gateway spec, repeatable (default: popen), "
                             "e.g. popen//python=python3.12 or 3*popen")
    parser.add_argument("source", help="Python source; `channel` is predefined")
    args = parser.parse_args(argv)

    import execnet

    specs = []
    for tx in args.tx or ["popen"]:
        count, sep, spec = tx.partition("*")
        if sep and count.isdigit():
            specs += [spec] * int(count)
        else:
            specs.append(tx)
    group = execnet.Group()
    status = 0
    try:
        channels = [(gw, gw.remote_exec(args.source))
                    for gw in (group.makegateway(spec) for spec in specs)]
        for gw, ch in channels:
            try:
                for item in ch:
                    print("%s: %r" % (gw.id, item))
            except execnet.RemoteError as exc:
                sys.stderr.write("%s: remote error:\n%s" % (gw.id, exc.formatted))
                status = 1
    finally:
        group.terminate(timeout=10)
    return status


if __name__ == "__main__":
    sys.exit(main())
