"""Build the native core in place, then run the test suite twice: with the C
engine and with the pure-Python engine (EXECNET_NO_EXTENSIONS=1).

Extra arguments go to pytest.  Exit status is non-zero if either run fails
or if the extension does not build.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(args):
    env = dict(os.environ, EXECNET_REQUIRE_EXTENSIONS="1", EXECNET_WERROR="1")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"],
                   cwd=ROOT, env=env, check=True)
    check = subprocess.run(
        [sys.executable, "-c", "import execnet.gateway_base as g; "
         "import execnet._execnet; assert g.backend == 'c', g.backend"],
        cwd=ROOT, env=dict(os.environ, EXECNET_NO_EXTENSIONS=""))
    if check.returncode:
        print("the native core does not load", file=sys.stderr)
        return 1
    status = 0
    for label, extra in (("C engine", {"EXECNET_NO_EXTENSIONS": ""}),
                         ("pure-Python engine", {"EXECNET_NO_EXTENSIONS": "1"})):
        print("\n===== %s =====" % label, flush=True)
        run = subprocess.run([sys.executable, "-m", "pytest", "testing"] + args,
                             cwd=ROOT, env=dict(os.environ, **extra))
        status = status or run.returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
