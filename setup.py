"""Build script: the package is pure Python plus the native core ``execnet._execnet``.

Environment knobs (all prefixed ``EXECNET_``):

* ``EXECNET_NO_EXTENSIONS=1``  build and install the pure-Python engine only
* ``EXECNET_DEBUG_BUILD=1``    -O0 -g3 -UNDEBUG
* ``EXECNET_SANITIZE=address,undefined``  build with those sanitizers
* ``EXECNET_WERROR=1``         turn warnings into errors
* ``EXECNET_REQUIRE_EXTENSIONS=1``  fail the build if the core does not compile (CI)
"""
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def flag(name):
    return os.environ.get("EXECNET_" + name, "") not in ("", "0")


def core_extension():
    cflags = ["-Wall", "-Wextra", "-Wno-unused-parameter",
              "-Wno-missing-field-initializers", "-std=c11"]
    ldflags = []
    if flag("WERROR"):
        cflags.append("-Werror")
    if flag("DEBUG_BUILD"):
        cflags += ["-O0", "-g3", "-UNDEBUG"]
    else:
        cflags += ["-O2"]
    sanitize = os.environ.get("EXECNET_SANITIZE", "")
    if sanitize:
        cflags += ["-fsanitize=" + sanitize, "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=" + sanitize]
    return Extension(
        "execnet._execnet",
        sources=sorted(glob.glob("csrc/*.c")),
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


class optional_build_ext(build_ext):
    """Fall back to the pure engine when the compiler fails, unless told not to."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure
            self._failed(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def _failed(self, exc):
        if flag("REQUIRE_EXTENSIONS"):
            raise exc
        sys.stderr.write(
            "\n*** WARNING: the native core execnet._execnet did not build (%s);\n"
            "*** installing the pure-Python engine only.\n\n" % (exc,))


ext_modules = []
if not flag("NO_EXTENSIONS") and glob.glob("csrc/*.c"):
    ext_modules.append(core_extension())

setup(ext_modules=ext_modules, cmdclass={"build_ext": optional_build_ext})
