"""Import torchvision on a torch whose build its compiled ops do not match.

torchvision 0.28's PyPI wheel is a CUDA build. On the CPU wheel of torch 2.13 its C++ extension
(``torchvision/_C``) fails to load; torchvision tolerates that, but its ``_meta_registrations``
then registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` and fails with
"operator torchvision::nms does not exist". Defining those two op schemas (no kernels) before the
first import lets it import; models, datasets and transforms work, only the compiled ops (nms,
roi_align, ...) stay unavailable, as torchvision itself reports.

Where the extension loads (a GPU machine with matching torch and torchvision) nothing is defined.
The rest of the project imports torchvision only through :func:`import_torchvision`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

import torch

# The one piece of module state in the project: the ``torch.library.Library`` that holds the two
# schemas must live as long as the process, or torch drops its definitions; and it may be created
# only once per process, since defining a schema twice is an error.
_SCHEMA_LIBRARY: torch.library.Library | None = None

_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def import_torchvision() -> ModuleType:
    """Return the torchvision module, defining the missing op schemas first if its ops cannot load."""
    if "torchvision" not in sys.modules and not _torchvision_ops_available():
        _define_missing_schemas()
    import torchvision

    return torchvision


def _torchvision_ops_available() -> bool:
    """Whether ``torchvision::nms`` exists, after trying to load torchvision's extension as it would."""
    if hasattr(torch.ops.torchvision, "nms"):
        return True
    extension_path = _extension_path()
    if extension_path is None:
        return False
    try:
        torch.ops.load_library(extension_path)
    except (ImportError, OSError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


def _extension_path() -> str | None:
    """Path of torchvision's compiled ``_C`` library, found the way torchvision finds it, or None."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    package_dir = os.path.dirname(spec.origin)
    loader_details = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    extension_spec = importlib.machinery.FileFinder(package_dir, loader_details).find_spec("_C")
    return None if extension_spec is None else extension_spec.origin


def _define_missing_schemas() -> None:
    """Define nms and qnms once per process, keeping their library alive in ``_SCHEMA_LIBRARY``."""
    global _SCHEMA_LIBRARY
    if _SCHEMA_LIBRARY is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_SCHEMAS:
        library.define(schema)
    _SCHEMA_LIBRARY = library
