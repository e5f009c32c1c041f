"""Example inputs for every module of a model, and the check that a traced graph computes what
its module computes on them.

fx traces with stand-in values, so a graph can silently fix what the Python code decided at
trace time (an optional input being ``None``, a branch taken). :class:`Capture` runs the
original model once on example inputs, keeping what each module received; :meth:`Capture.check`
then runs a module's graph on those inputs against the module itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from cosconvert.inputs import InputSpec

__all__ = ["Capture", "example_batch", "optional_inputs", "quiet"]


def optional_inputs(module: nn.Module) -> list[str]:
    """Names of ``module.forward``'s inputs that default to ``None``: a graph traced once would
    fix whether each is given."""
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is None and p.kind is not p.VAR_KEYWORD]


def example_batch(example_inputs, calibration_data: Iterable | None) -> tuple[tuple, dict, str] | None:
    """(args, kwargs, where from) of the user's inputs: ``example_inputs`` (a tuple, a tensor or a
    dict of keyword inputs) or the first batch of ``calibration_data``; None if neither."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), dict(example_inputs), "example_inputs"
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        return tuple(args), {}, "example_inputs"
    if calibration_data is not None:
        from cosconvert.data import batch_inputs

        for batch in calibration_data:
            return batch_inputs(batch), {}, "the first calibration batch"
    return None


_MODULE_STATE = {"_parameters", "_buffers", "_modules"}


@contextmanager
def quiet(model: nn.Module):
    """No gradients, the same random numbers each run (dropout), and buffers (BatchNorm's running
    statistics) and plain attributes put back afterwards: a module that resets its own settings to
    fit an input (Swin shrinks ``window_size`` to a small image) must not keep them for the next."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    attributes = [(m, {k: v for k, v in vars(m).items() if k not in _MODULE_STATE}) for m in model.modules()]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            for buffer, saved in buffers:
                buffer.copy_(saved)
            for module, saved in attributes:
                for key in [k for k in vars(module) if k not in saved and k not in _MODULE_STATE]:
                    delattr(module, key)
                for key, value in saved.items():
                    if vars(module).get(key, value) is not value:
                        setattr(module, key, value)


def _clone(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)


def _versions(tree) -> list[int]:
    return [t._version for t in tree_leaves(tree) if isinstance(t, Tensor)]


class _Kept:
    """A value kept by reference (no copy), and whether anything has written into it since."""

    def __init__(self, value) -> None:
        self.value, self.versions = value, _versions(value)

    def intact(self) -> bool:
        return _versions(self.value) == self.versions


class Capture:
    """What each module of ``model`` received on one run (its first call), and where the inputs came
    from. ``model`` is run once, unchanged; ``modules`` limits which modules are recorded."""

    def __init__(self, model: nn.Module, batch: tuple[tuple, dict, str] | None, modules: Iterable[nn.Module]) -> None:
        self.inputs: dict[nn.Module, _Kept] = {}  # (args, kwargs) of each module's first call
        self.outputs: dict[nn.Module, _Kept] = {}  # what it returned
        self.source: str | None = None
        self.checked, self.disagreed = 0, 0
        tries = [(batch[0], batch[1], batch[2])] if batch is not None else [
            ((spec.random(device=next(model.parameters()).device),), {}, f"{spec} inferred from the first layer")
            for spec in InputSpec.candidates(model, probe=True)
        ]  # fmt: skip
        watched = list(modules)
        for args, kwargs, what in tries:
            if self._record(model, watched, args, kwargs):
                self.source = what
                self.example = (args, kwargs)
                return
            self.inputs.clear()
            self.outputs.clear()
        self.example = None

    def _record(self, model: nn.Module, watched: list[nn.Module], args: tuple, kwargs: dict) -> bool:
        def before(module, a, k):
            if module not in self.inputs:
                self.inputs[module] = _Kept((a, k))

        def after(module, a, k, out):
            if module not in self.outputs:
                self.outputs[module] = _Kept(out)

        handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in watched]
        handles += [m.register_forward_hook(after, with_kwargs=True) for m in watched]
        try:
            with quiet(model):
                model(*args, **kwargs)
            return True
        except Exception:  # noqa: BLE001 - any failure means these inputs do not fit the model
            return False
        finally:
            for handle in handles:
                handle.remove()

    def check(self, graph: nn.Module, module: nn.Module) -> str | None:
        """Why ``graph`` (traced from ``module``, not rewritten yet) is not ``module`` on its
        example inputs, or None if they agree or there are no inputs to check on."""
        kept = self.inputs.get(module)
        if kept is None or not kept.intact():  # written into later in the run (an in-place op): unusable
            return None
        args, kwargs = kept.value
        self.checked += 1
        done = self.outputs.get(module)
        if module.training or done is None or not done.intact():  # dropout draws anew, or overwritten
            with quiet(module):
                expected = module(*_clone(args), **_clone(kwargs))
        else:
            expected = done.value
        try:
            with quiet(module):
                got = graph(*_clone(args), **_clone(kwargs))
        except Exception as err:  # noqa: BLE001 - a graph that fails where its module runs is wrong
            self.disagreed += 1
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"its traced graph fails on the example inputs ({type(err).__name__}: {first[:120]})"
        reason = _disagreement(expected, got)
        self.disagreed += reason is not None
        return reason


def _disagreement(expected, got) -> str | None:
    want, have = tree_leaves(expected), tree_leaves(got)
    want, have = [t for t in want if isinstance(t, Tensor)], [t for t in have if isinstance(t, Tensor)]
    if [t.shape for t in want] != [t.shape for t in have]:
        return "its traced graph gives outputs of other shapes than the module on the example inputs"
    for a, b in zip(want, have):
        if a.is_floating_point():
            scale = a.abs().max().item() if a.numel() else 0.0
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-6), equal_nan=True):
                return "its traced graph computes other values than the module on the example inputs"
        elif not torch.equal(a, b):
            return "its traced graph computes other values than the module on the example inputs"
    return None
