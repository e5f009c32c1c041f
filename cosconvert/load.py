"""Load a user's model from disk, safely: nothing is unpickled unless the user trusts the file.

Accepted: a state_dict or checkpoint (``torch.load(weights_only=True)``) or a ``.safetensors``
file, with ``arch`` (``module:callable`` or ``path/to/file.py:Callable``) to build the network;
a ``torch.export`` program (``.pt2``); a fully pickled ``nn.Module`` only with
``trust_pickle=True``. TorchScript archives are refused: their code is not Python that fx
can rewrite.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadError", "load_model", "build_arch", "infer_input_shape"]


class LoadError(ValueError):
    """A model that cannot be loaded, with what to do about it."""


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Call ``module:callable`` (or ``path/to/file.py:Callable``) with ``kwargs``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"--arch {spec!r} is not of the form module:callable (e.g. torchvision.models:resnet18)")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise LoadError(f"--arch file {module_name} not found")
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise LoadError(f"--arch {spec!r} cannot be imported: {err}") from err
    try:
        model = factory(**(kwargs or {}))
    except TypeError as err:
        raise LoadError(f"--arch {spec!r} could not be built with {kwargs or {}}: {err}") from err
    if not isinstance(model, nn.Module):
        raise LoadError(f"--arch {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _kind(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names) or path.suffix == ".pt2":
            return "export"
    return "torch"


def _state_dict(obj) -> dict:
    """The state_dict inside a checkpoint: the object itself, or under a usual key."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "weights"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise LoadError("the file holds no state_dict (a dict of tensors, or one under 'state_dict' or 'model')")


def _load_weights(path: Path, kind: str, trust_pickle: bool):
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise LoadError(f"{path} is not a readable safetensors file ({err}); is it truncated?") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not code it refused, just bytes it could not read
            raise LoadError(f"{path} is corrupt or truncated, or not a PyTorch file (it does not unpickle)") from err
        raise LoadError(
            f"{path} holds pickled Python objects (a whole nn.Module?), and unpickling runs code: "
            "pass --trust-pickle if you trust this file, or save model.state_dict() and use --arch"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise LoadError(f"{path} is corrupt or truncated, or not a PyTorch file ({str(err).splitlines()[0]})") from err


def load_model(
    path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, tuple | None]:
    """The model in ``path`` in eval mode, and example inputs where the file carries them."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"model file {path} not found")
    kind = _kind(path)
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive: its code is compiled TorchScript, which cosconvert cannot rewrite; "
            "give the original model's state_dict with --arch, or a torch.export program (.pt2)"
        )
    if kind == "export":
        try:
            program = torch.export.load(path)
        except Exception as err:  # noqa: BLE001 - torch.export.load raises many types
            raise LoadError(f"{path} is not a readable torch.export program ({err})") from err
        module = program.module()
        for node in list(module.graph.nodes):  # shape guards pin the batch size; conversion keeps it free
            if node.op == "call_module" and node.target == "_guards_fn":
                module.graph.erase_node(node)
        # A plain GraphModule: the program's own module refuses .train()/.eval() (its mode is baked in).
        module = torch.fx.GraphModule(module, module.graph, "ExportedProgram")
        args = program.example_inputs[0] if program.example_inputs else None
        return module, args
    obj = _load_weights(path, kind, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval(), None
    if arch is None:
        raise LoadError(f"{path} holds weights only: say which network they belong to with --arch module:callable")
    model = build_arch(arch, arch_kwargs)
    try:
        model.load_state_dict(_state_dict(obj))
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])
        detail = detail if len(detail) < 300 else detail[:297] + "..."
        raise LoadError(f"the weights in {path} do not fit --arch {arch}: {detail}") from err
    return model.eval(), None


def parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoadError(f"--arch-kwargs is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise LoadError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """A plausible input shape from the first linear or conv layer: images 224x224, signals 128."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, 224, 224)
        if isinstance(m, nn.Conv1d):
            return (1, m.in_channels, 128)
        if isinstance(m, nn.Conv3d):
            return (1, m.in_channels, 16, 64, 64)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise LoadError("cannot infer the input shape: give --input-shape, e.g. 1,3,224,224")
