"""Load a user's model from disk, safely: nothing is unpickled unless the user trusts the file.

Accepted: a state_dict or checkpoint (``torch.load(weights_only=True)``) or a ``.safetensors``
file, with ``arch`` to build the network (see :func:`build_arch`);
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

from cosconvert.errors import InputError, first_line

__all__ = ["LoadError", "load_model", "build_arch"]


class LoadError(InputError):
    """A model that cannot be loaded, with what to do about it."""


REGISTRIES = ("timm", "torchvision", "transformers")


def _from_registry(registry: str, name: str, kwargs: dict) -> nn.Module:
    """A randomly initialized network named in timm's, torchvision's or transformers' own registry."""
    if registry == "timm":
        import timm

        if not timm.is_model(name):
            raise LoadError(f"--arch timm:{name}: timm has no model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=False, **kwargs)
    if registry == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise LoadError(f"--arch torchvision:{name}: torchvision has no model {name!r}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    import transformers

    cls = getattr(transformers, name, None)
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise LoadError(f"--arch transformers:{name}: not a transformers model class (e.g. ViTForImageClassification)")
    kwargs = dict(kwargs)
    config_file = kwargs.pop("config", None)  # a config.json (or its folder) to start from
    default = config_class.from_pretrained(config_file, local_files_only=True) if config_file else config_class()
    for key in kwargs:
        if not hasattr(default, key):
            raise LoadError(f"--arch-kwargs: {config_class.__name__} has no field {key!r}")
    # built from the keywords, not set on a built config: fields its constructor derives must follow
    config = config_class(**{**default.to_dict(), **kwargs}) if config_file else config_class(**kwargs)
    return cls(config)


def _import(module_name: str):
    if module_name.endswith(".py"):
        if not Path(module_name).is_file():
            raise LoadError(f"--arch file {module_name} not found")
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        sys.modules[loader.name] = module
        loader.loader.exec_module(module)
        return module
    return importlib.import_module(module_name)


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    """The network named by ``spec``, randomly initialized, built with ``kwargs``:

    - ``timm:NAME`` (``timm.create_model``), ``torchvision:NAME`` (``torchvision.models.get_model``),
    - ``transformers:CLASS`` (e.g. ``ViTForImageClassification``) built from its config class, whose
      fields ``kwargs`` sets (``{"config": "path/config.json"}`` starts from a saved config),
    - ``module:callable`` or ``path/to/file.py:Callable``, called with ``kwargs``.
    """
    module_name, sep, attr = spec.partition(":") if spec.split(":")[0] in REGISTRIES else spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise LoadError(
            f"--arch {spec!r} is not of the form timm:NAME, torchvision:NAME, transformers:CLASS, module:callable "
            "or file.py:Class (e.g. torchvision:resnet18)"
        )
    kwargs = kwargs or {}
    try:
        if module_name in REGISTRIES:
            model = _from_registry(module_name, attr, kwargs)
        else:
            factory = getattr(_import(module_name), attr)
            model = factory(**kwargs)
    except LoadError:
        raise
    except (ImportError, AttributeError) as err:
        raise LoadError(f"--arch {spec!r} cannot be imported: {first_line(err, with_type=True)}") from err
    except Exception as err:  # noqa: BLE001 - the user's constructor can raise anything
        raise LoadError(f"--arch {spec!r} could not be built with {kwargs}: {first_line(err, with_type=True)}") from err
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
    except Exception as err:  # noqa: BLE001 - a text file named .pt fails with KeyError, IndexError, ...
        raise LoadError(
            f"{path} is corrupt or truncated, or not a PyTorch file ({first_line(err, with_type=True)})"
        ) from err


def _looks_like_text(path: Path) -> bool:
    """Whether the file starts like text (a PyTorch file is a zip, or a pickle starting with byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(512)
    return bool(head) and not head.startswith(b"\x80") and b"\x00" not in head and head.isascii()


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
    if kind == "torch" and not zipfile.is_zipfile(path) and _looks_like_text(path):
        raise LoadError(f"{path} is a text file, not a PyTorch file: give the file torch.save wrote")
    obj = _load_weights(path, kind, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.eval(), None
    if arch is None:
        raise LoadError(f"{path} holds weights only: say which network they belong to with --arch module:callable")
    model = build_arch(arch, arch_kwargs)
    try:
        model.load_state_dict(_state_dict(obj))
    except (RuntimeError, TypeError, ValueError) as err:
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
