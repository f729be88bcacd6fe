"""Fast cores: each exists as a Cython module ``_x_c`` and a pure-Python twin ``_x_py``.

:func:`load` picks the compiled one unless ``INFERD_NO_EXTENSIONS=1`` is set or the
build has none, following the aio-libs pattern (yarl, aiohttp, multidict). Both twins
have the same API, behaviour and error messages; the test suite runs against each.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: True when the environment asks for the pure-Python twins.
NO_EXTENSIONS: bool = os.environ.get("INFERD_NO_EXTENSIONS", "") not in ("", "0")

_in_use: dict[str, str] = {}


def load(core: str) -> ModuleType:
    """Import core ``core`` (e.g. ``"sse"``): ``_sse_c`` if possible, else ``_sse_py``."""
    if not NO_EXTENSIONS:
        try:
            mod = importlib.import_module(f"inferd._fast._{core}_c")
        except ImportError:
            pass
        else:
            _in_use[core] = "c"
            return mod
    _in_use[core] = "py"
    return importlib.import_module(f"inferd._fast._{core}_py")


def load_twin(core: str, kind: str) -> ModuleType:
    """Import one specific twin (``kind`` is ``"c"`` or ``"py"``); tests use this."""
    return importlib.import_module(f"inferd._fast._{core}_{kind}")


#: The cores that have a C and a Python twin (``_llama`` is compiled only).
TWIN_CORES = ("sse", "chunks")


def cores_in_use() -> dict[str, str]:
    """Which twin each core uses, loading every core first: ``{"sse": "c", ...}``.

    :func:`load` is what the facades (:mod:`inferd.sse`, :mod:`inferd.toolcalls`) call,
    and it returns the same module every time, so this is what they use.
    """
    for core in TWIN_CORES:
        load(core)
    return dict(_in_use)


def compiled_cores() -> dict[str, bool]:
    """Whether each core's compiled twin is importable (whatever the env says)."""
    found: dict[str, bool] = {}
    for core in TWIN_CORES:
        try:
            importlib.import_module(f"inferd._fast._{core}_c")
        except ImportError:
            found[core] = False
        else:
            found[core] = True
    return found


def compiled_available() -> bool:
    """True when every compiled streaming core is importable (whatever the env says)."""
    return all(compiled_cores().values())
