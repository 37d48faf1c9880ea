"""RSync: mirror a directory to gateways -- not implemented yet.

The class exists so that ``from execnet import *`` and subclasses defined at
import time keep working; creating an instance raises NotImplementedError.
"""


class RSync:
    """Send a directory tree to one or more gateways (not implemented yet)."""

    def __init__(self, sourcedir, callback=None, verbose=True):
        raise NotImplementedError("execnet.RSync is not implemented yet")

    def filter(self, path):
        return True

    def _report_send_file(self, gateway, modified_rel_path):
        pass
