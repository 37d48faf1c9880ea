"""XSpec: a gateway specification string such as ``popen//python=python3``."""


class XSpec:
    """Execution specification: ``key1=value1//key2=value2//...``.

    A bare key reads as True, ``env:NAME=value`` goes into ``env``, every
    other key (known or not) becomes an attribute; absent keys read as None.
    """

    # every key execnet documents, None unless given
    id = None
    popen = ssh = socket = via = vagrant_ssh = None
    python = chdir = nice = dont_write_bytecode = execmodel = None
    installvia = ssh_config = None
    stdout = None  # popen: devnull (default), stderr or inherit

    def __init__(self, string):
        self._spec = string
        self.env = {}
        for keyvalue in string.split("//"):
            i = keyvalue.find("=")
            if i == -1:
                key, value = keyvalue, True
            else:
                key, value = keyvalue[:i], keyvalue[i + 1:]
            if key[0] == "_":
                raise AttributeError("%r not a valid XSpec key" % key)
            if key.startswith("env:"):
                self.env[key[4:]] = value  # the last one wins
            elif key in self.__dict__:
                raise ValueError("duplicate key: %r in %r" % (key, string))
            else:
                setattr(self, key, value)

    def __getattr__(self, name):
        if name[0] == "_":
            raise AttributeError(name)
        return None

    def __repr__(self):
        return "<XSpec %r>" % (self._spec,)

    def __str__(self):
        return self._spec

    def __hash__(self):
        return hash(self._spec)

    def __eq__(self, other):
        return self._spec == getattr(other, "_spec", None)

    def __ne__(self, other):
        return not self == other

    def _samefilesystem(self):
        return self.popen is not None and self.chdir is None
