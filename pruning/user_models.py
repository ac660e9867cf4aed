"""A user's own model, named by a reference instead of a registry name.

``create_model`` accepts, besides the registry's names:

- ``package.module:factory``: an importable module and a name in it;
- ``path/to/file.py:factory``: a Python file and a name in it (recorded by absolute path);
- ``torchvision:NAME``: any torchvision classification model, with random weights (never downloads).

No torch at import (the config canonicalises references through this module); the model is
built by ``pruning.models.create_model``.

The factory is a class or a function returning an ``nn.Module``; it is called with the config's
``model_args`` and, when its signature takes them, ``num_classes`` and ``in_channels``.

A file is imported once per process under a private module name. Where its recorded path does not
exist (a Ray worker on another machine), the module is imported by the file's stem instead: the
driver ships the file to a cluster's workers as a Ray ``py_modules`` entry (:func:`code_to_ship`),
which makes it importable by that name.

``load_weights`` gives such a model (or a registry's) the user's trained weights (``--weights``):
a state_dict file, or a training checkpoint holding one (``STATE_DICT_KEYS``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunetune.pruning.errors import UserError

TORCHVISION_PREFIX = "torchvision:"
_FILE_MODULE_PREFIX = "prunetune_user_file_"

if TYPE_CHECKING:
    from torch import nn


def is_reference(name: str) -> bool:
    """Whether ``name`` is a model reference (``a:b``) rather than a registry name."""
    return ":" in name


def _split(ref: str) -> tuple[str, str]:
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise UserError(f"model reference {ref!r} is malformed; write package.module:factory, "
                        f"path/to/file.py:factory or torchvision:NAME")
    return where, attr


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _check_python_file(ref: str, where: str) -> None:
    """Refuse a file reference whose file is no ``.py`` file: Python imports nothing else (and
    ``importlib`` would give no loader for it)."""
    if not where.endswith(".py"):
        raise UserError(f"'{ref}' names the file {where}, which is not a Python file (.py); name the .py file "
                        f"that defines it: path/to/file.py:factory")


def short_name(ref: str) -> str:
    """A short label of a model or dataset: a registry name itself, a reference's factory name."""
    return ref.rpartition(":")[2].rpartition(".")[2] or ref if is_reference(ref) else ref


def canonical_reference(ref: str) -> str:
    """``ref`` with a file path made absolute (so a Ray worker and a saved model find the same file)."""
    if not is_reference(ref) or ref.startswith(TORCHVISION_PREFIX):
        return ref
    where, attr = _split(ref)
    if _is_file(where):
        _check_python_file(ref, where)
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return ref


def _load_file(path: Path) -> Any:
    """The module of Python file ``path``, imported once per process (or, where the path does not
    exist here, the module of that stem shipped to this worker)."""
    if not path.is_file():
        try:
            return importlib.import_module(path.stem)
        except ImportError:
            raise UserError(f"model file {path} does not exist; give the path of a Python file "
                            f"(on a cluster, the driver ships it to the workers)") from None
    name = _FILE_MODULE_PREFIX + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UserError(f"cannot import model file {path} ({described(error)}); fix the file") from None
    return module


def described(error: BaseException) -> str:
    """``"ValueError: its message's first line"``: an exception of the user's code, fit for one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _import(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as error:
        raise UserError(f"cannot import module '{where}' of the model ({error}); check the name, or "
                        f"give a file path such as path/to/{where.rpartition('.')[2]}.py:factory") from None
    except Exception as error:
        raise UserError(f"importing module '{where}' of the model failed ({type(error).__name__}: {error}); "
                        f"fix the module") from None


def resolve_factory(ref: str) -> Callable[..., nn.Module]:
    """The class or function that ``ref`` (``module:name`` or ``file.py:name``) names."""
    where, attr = _split(ref)
    if _is_file(where):
        _check_python_file(ref, where)
    module = _load_file(Path(where).expanduser()) if _is_file(where) else _import(where)
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"'{where}' has no attribute '{attr}'; name a class or function defined there")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"'{ref}' is a {type(target).__name__}, not a class or function; name a factory "
                        f"that returns an nn.Module")
    return target


def _accepts(factory: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def build_reference(ref: str, num_classes: int, in_channels: int, model_args: Mapping[str, Any] | None) -> nn.Module:
    """A fresh model from reference ``ref``; UserError unless it yields an ``nn.Module``."""
    from torch import nn

    from prunetune.pruning.models import _torchvision_model

    args = dict(model_args or {})
    if ref.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(ref[len(TORCHVISION_PREFIX):], num_classes, in_channels, **args)
    factory = resolve_factory(ref)
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if name not in args and _accepts(factory, name):
            args[name] = value
    model = _call_factory(ref, factory, args)
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory '{ref}' returned a {type(model).__name__}, not a torch.nn.Module; "
                        f"return the model from it")
    return model


def _call_factory(ref: str, factory: Callable[..., Any], args: dict[str, Any]) -> Any:
    """``factory(**args)``, where the user's code failing is a UserError naming ``ref``: arguments its
    signature does not take, or whatever its body raises (type and first line; a UserError as it is)."""
    try:
        inspect.signature(factory).bind(**args)
        signed = True
    except TypeError as error:
        raise _refused_arguments(ref, args, error) from None
    except ValueError:  # no signature to read (a builtin): its TypeError may be about the arguments
        signed = False
    try:
        return factory(**args)
    except UserError:
        raise
    except Exception as error:
        if isinstance(error, TypeError) and not signed:
            raise _refused_arguments(ref, args, error) from None
        raise UserError(f"model factory '{ref}' raised {described(error)}; fix the model's constructor") from None


def _refused_arguments(ref: str, args: Mapping[str, Any], error: TypeError) -> UserError:
    return UserError(f"model factory '{ref}' refused its arguments {sorted(args)} ({error}); set or "
                     f"remove them with --set model_args.KEY=VALUE")


def reference_key(ref: str, model_args: Mapping[str, Any] | None) -> str:
    """A short name safe in a file name, that changes with the reference, its arguments and, for a
    file, the file's contents (so a cached base model is not reused for an edited model)."""
    text = f"{ref}|{sorted((model_args or {}).items())!r}"
    if is_reference(ref) and not ref.startswith(TORCHVISION_PREFIX):
        where, _ = _split(ref)
        path = Path(where)
        if _is_file(where) and path.is_file():
            text += hashlib.sha256(path.read_bytes()).hexdigest()
    stem = "".join(c if c.isalnum() or c in "._" else "-" for c in ref.rpartition("/")[2])[-40:]
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def code_to_ship(ref: str) -> list[str]:
    """The local files or package folders a cluster's Ray workers need to import ``ref``: a Ray
    runtime environment's ``py_modules`` (a file path's file; an import path's top-level package)."""
    if not is_reference(ref) or ref.startswith(TORCHVISION_PREFIX):
        return []
    where, _ = _split(ref)
    if _is_file(where):
        return [str(Path(where).expanduser().resolve())]
    top = where.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.origin in (None, "built-in", "frozen") or _installed(spec.origin):
        return []
    if spec.submodule_search_locations:  # a package: its folder
        return [str(Path(next(iter(spec.submodule_search_locations))).resolve())]
    return [str(Path(spec.origin).resolve())]


def _installed(origin: str) -> bool:
    """Whether a module lives in an installed environment (which the cluster's image provides)."""
    return any(part in ("site-packages", "dist-packages") for part in Path(origin).parts)


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")  # a training checkpoint's, tried in order
DATA_PARALLEL_PREFIX = "module."  # nn.DataParallel's and DistributedDataParallel's, on every key


def load_weights(model: nn.Module, path: str | Path, *, model_name: str) -> nn.Module:
    """Load the user's trained ``state_dict`` file into ``model``, read with ``weights_only=True``.

    The file is ``torch.save(model.state_dict(), PATH)``, or a training checkpoint: a dict holding
    the state_dict under ``'state_dict'``, ``'model_state_dict'``, ``'model'`` or ``'net'`` (the
    first of these, in that order, whose value maps names to tensors). A state_dict saved from an
    ``nn.DataParallel`` or ``DistributedDataParallel`` wrapper (``module.`` before every key) is
    loaded without that prefix. Refused in one line: a file ``torch.load`` cannot read, a pickled
    module (``torch.save(model)``), and a state_dict whose keys or shapes do not fit (the message
    names the first mismatched key).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give the file saved with "
                        f"torch.save(model.state_dict(), PATH)")
    expected = model.state_dict()
    state = _without_data_parallel_prefix(_state_dict_in(_read_checkpoint(path), path), expected)
    _check_fits(state, expected, path, model_name)
    model.load_state_dict(state)
    return model


def _read_checkpoint(path: Path) -> Any:
    """What ``torch.load(path, weights_only=True)`` reads; UserError for a file it cannot read."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # its warnings about a file's pickle protocol are no line for the user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise UserError(f"weights file {path} holds a pickled object, not a state_dict (weights_only=True "
                            f"refuses {refused.group(1)}); save the weights alone with "
                            f"torch.save(model.state_dict(), PATH)") from None
        reason = _unpickler_reason(error)
    except OSError as error:
        raise UserError(f"cannot read weights file {path} ({described(error)}); give a readable file saved "
                        f"with torch.save(model.state_dict(), PATH)") from None
    except Exception as error:  # text (KeyError), a cut file (EOFError), a damaged zip (RuntimeError), ...
        reason = _load_failure(path, error)
    raise UserError(f"{path} is not a torch checkpoint ({reason}); pass a file written by "
                    f"torch.save(model.state_dict(), {path})")


def _load_failure(path: Path, error: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words."""
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    failure = described(error).split(". ")[0][:120]
    return f"a damaged zip archive: {failure}" if head == b"PK\x03\x04" else f"torch.load: {failure}"


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only unpickler that says what it met (its first lines say only
    that it failed)."""
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    return f"UnpicklingError: {detail.group(1).strip()[:120]}" if detail else described(error)[:120]


def _is_tensor_mapping(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items())


def _state_dict_in(loaded: Any, path: Path) -> dict:
    """The state_dict of what the file held: itself, or a checkpoint's under ``STATE_DICT_KEYS``."""
    if _is_tensor_mapping(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            value = loaded.get(key)
            if _is_tensor_mapping(value) and value:
                return dict(value)
        keys = ", ".join(repr(k) for k in list(loaded)[:8])
        held = f"a dict of {keys}{', ...' if len(loaded) > 8 else ''}"
    else:
        held = f"a {type(loaded).__name__}"
    wrapped = ", ".join(f"'{k}'" for k in STATE_DICT_KEYS[:-1]) + f" or '{STATE_DICT_KEYS[-1]}'"
    raise UserError(f"weights file {path} holds {held}, not a state_dict of tensors; save it with "
                    f"torch.save(model.state_dict(), PATH), or a checkpoint dict holding it under {wrapped}")


def _without_data_parallel_prefix(state: dict, expected: Mapping) -> dict:
    """``state`` with ``module.`` cut from every key, where a DataParallel wrapper put it on all of them."""
    prefix = DATA_PARALLEL_PREFIX
    if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_fits(state: Mapping, expected: Mapping, path: Path, model_name: str) -> None:
    """UserError naming the first key of ``expected`` that ``state`` lacks or shapes otherwise, or the
    first key of ``state`` that the model has not."""
    for key, tensor in expected.items():
        if key not in state:
            prefix = _shared_prefix(state)
            if prefix and prefix + key in state:
                raise UserError(f"weights {path} do not fit {model_name}: key '{key}' is missing from the file, "
                                f"whose keys all start with '{prefix}' ('{prefix}{key}'); save the state_dict of "
                                f"the model itself, without that prefix")
            raise UserError(f"weights {path} do not fit {model_name}: key '{key}' (shape {tuple(tensor.shape)}) "
                            f"is missing from the file; save the state_dict of this architecture")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(f"weights {path} do not fit {model_name}: key '{key}' has shape "
                            f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model; "
                            f"build the model for the same classes, channels and model_args")
    extra = [key for key in state if key not in expected]
    if extra:
        raise UserError(f"weights {path} do not fit {model_name}: the file has key '{extra[0]}', which the "
                        f"model has not; save the state_dict of this architecture")


def _shared_prefix(state: Mapping) -> str | None:
    """``"model."`` where every key of ``state`` starts with that one first component, else None."""
    firsts = {str(k).partition(".")[0] + "." for k in state if "." in str(k)}
    return firsts.pop() if len(firsts) == 1 and all("." in str(k) for k in state) else None


def check_weights_alone(weights: str | None, pretrain_epochs: int | None, flag: str = "--pretrain-epochs") -> None:
    """Refuse pretraining epochs the user asked for beside ``weights``: with weights the base model is
    not pretrained, so the epochs would be dropped silently. ``pretrain_epochs`` is None where not asked."""
    if weights is not None and pretrain_epochs is not None:
        raise UserError(f"{flag} {pretrain_epochs} has no effect with --weights {weights}: the base model is then "
                        f"your weights, not pretrained; drop {flag}, or drop --weights to pretrain it")


def reference_of(obj: Any, what: str = "model") -> str:
    """``module:qualname`` of a class or function (the defining script's file when it is ``__main__``),
    which a Ray worker imports to get ``obj`` again."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or "<" in qualname:
        raise UserError(f"the {what} factory {obj!r} is not a module-level class or function, so Ray workers "
                        f"cannot import it; define it at the top level of a module or file")
    if module_name == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if not path:
            raise UserError(f"the {what} factory {qualname} is defined in an interactive session, which Ray "
                            f"workers cannot import; define it in a file and pass it, or 'path/to/file.py:{qualname}'")
        return f"{Path(path).resolve()}:{qualname}"
    return f"{module_name}:{qualname}"


def portable_name(name: str) -> str:
    """``name``, or for a builder the user put in ``MODEL_BUILDERS`` at run time (which a Ray worker's
    fresh registry lacks) the reference to that builder, which the worker imports."""
    from prunetune.pruning import models

    builder = models.MODEL_BUILDERS.get(name)
    if builder is None or getattr(builder, "__module__", None) == models.__name__:
        return name
    try:
        return reference_of(builder)
    except UserError:
        return name
