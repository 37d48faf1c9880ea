"""Memory-safety jobs for the native core (CI runs them after the suite).

1. ASan+UBSan: build the extension with EXECNET_SANITIZE=address,undefined
   in a scratch copy of the tree and run the C-facing tests under it.
2. valgrind: run the serializer and channel-queue tests on the normal build
   and fail on definite leaks.
3. tsan: ThreadSanitizer build of the extension, the engine tests under it
   (the senders, the writer role, the flusher thread and the receiver).
   TSan needs address-space randomization off here: run under setarch -R.
   Everything runs several times slower there, so EXECNET_LAX_TIMING tells
   the tests to skip (not fail) when the flusher or payload recycling did
   not engage.  Set TSAN_OPTIONS=log_path=/some/dir/report to keep the
   reports (they are added to the job's own options).

Usage: python testing/check_memory.py [asan] [valgrind] [tsan]
(default: asan and valgrind)
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASAN_TESTS = ["testing/test_cserializer.py", "testing/test_cengine.py",
              "testing/test_serializer.py", "testing/test_channel.py"]
# Under valgrind everything runs ~50x slower: sends are never close enough
# together for the flusher, nor consumers quick enough for payload
# recycling, so the tests asserting that those engage are left out there.
VALGRIND_TESTS = ["testing/test_cserializer.py", "testing/test_cengine.py",
                  "-k", "not sigint and not gateway and not pure_master"
                        " and not flusher and not burst and not recycl"]


def copy_tree(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)


def sanitized_build(tmp, sanitize):
    copy_tree(tmp)
    env = dict(os.environ, EXECNET_SANITIZE=sanitize,
               EXECNET_DEBUG_BUILD="1", EXECNET_REQUIRE_EXTENSIONS="1",
               EXECNET_WERROR="1")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                   cwd=tmp, env=env, check=True)


def gcc_lib(name):
    return subprocess.run(["gcc", "-print-file-name=" + name],
                          capture_output=True, text=True).stdout.strip()


PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
          "-p", "no:xdist", "-p", "no:cov"]


def checked_env(**extra):
    """The environment for a checked test run: the native core on, dev
    mode off, CPython's allocator replaced by malloc (so the tools see
    every allocation)."""
    env = dict(os.environ, PYTHONMALLOC="malloc", EXECNET_NO_EXTENSIONS="",
               **extra)
    env.pop("PYTHONDEVMODE", None)
    return env


def asan():
    with tempfile.TemporaryDirectory(prefix="execnet-asan-") as tmp:
        sanitized_build(tmp, "address,undefined")
        env = checked_env(LD_PRELOAD=gcc_lib("libasan.so"),
                       ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        return subprocess.run(PYTEST + ASAN_TESTS, cwd=tmp, env=env).returncode


def tsan():
    with tempfile.TemporaryDirectory(prefix="execnet-tsan-") as tmp:
        sanitized_build(tmp, "thread")
        # TSAN_OPTIONS from the environment (e.g. log_path=...) are added
        # after the defaults, so they can override them
        options = ":".join(filter(None, [
            "halt_on_error=1:report_signal_unsafe=0",
            os.environ.get("TSAN_OPTIONS", "")]))
        env = checked_env(LD_PRELOAD=gcc_lib("libtsan.so"),
                          TSAN_OPTIONS=options, EXECNET_LAX_TIMING="1")
        cmd = PYTEST + ["testing/test_cengine.py",
                        # forking under TSan and the gateway tests (whose
                        # children inherit LD_PRELOAD) are out of its scope
                        "-k", "not fork and not gateway and not pure_master"]
        if shutil.which("setarch"):
            cmd = ["setarch", os.uname().machine, "-R"] + cmd
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


def valgrind():
    if not shutil.which("valgrind"):
        print("valgrind is not installed", file=sys.stderr)
        return 1
    env = checked_env()
    run = subprocess.run(
        ["valgrind", "--leak-check=full", "--errors-for-leak-kinds=definite",
         "--undef-value-errors=no",  # CPython itself trips these (no _execnet frames)
         "--suppressions=" + os.path.join(ROOT, "testing", "valgrind.supp"),
         "--show-leak-kinds=definite", "--error-exitcode=97", "--quiet"]
        + PYTEST + VALGRIND_TESTS,
        cwd=ROOT, env=env)
    return run.returncode


def main(args):
    jobs = args or ["asan", "valgrind"]
    status = 0
    for job in jobs:
        print("\n===== %s =====" % job, flush=True)
        rc = {"asan": asan, "valgrind": valgrind, "tsan": tsan}[job]()
        print("%s: %s" % (job, "ok" if rc == 0 else "FAILED (%d)" % rc), flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
