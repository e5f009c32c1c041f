"""Blockwise reconstruction: train each block of a converted network to reproduce the original's.

Calibration fits one gain and bias per unit; through dozens of layers that cannot follow each
layer's ``1/|x|``, which varies from position to position, and the errors compound. Here, as in
the block-wise modes of quantization tools (BRECQ, AdaRound), each block ``B_j`` of the converted
network is trained, in order, to minimise

    MSE( converted B_j(x_j), a_j )

where ``x_j`` is what the converted network, its blocks before ``j`` already reconstructed, feeds
block ``j``, and ``a_j`` the original network's own activation there on the same inputs (so the
block also corrects the error it is fed; ``target="block"``: the original ``B_j(x_j)``, as BRECQ).
The loss is local, needs no labels, and one block's inputs and targets are all that is held at a
time: each network runs up to block ``j`` (and stops there) to make them.

A converted network is often one flat ``torch.fx`` graph in which a block such as ``layer1.0`` is
no module of its own. Such blocks are outlined for the run: the block's nodes become a small
GraphModule sharing the converted network's parameters, called from a copy of the graph.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from cosconvert import functional as CF
from cosconvert.amp import mixed_precision
from cosconvert.calibration import LayerFits
from cosconvert.data import batch_inputs, load_data
from cosconvert.distributed import all_sum, average_gradients, fsdp_modules, rank_and_world, whole_parameters
from cosconvert.layers import LAYERS, LEAVES
from cosconvert.trace import fetch, trace

__all__ = ["reconstruct", "find_blocks"]

REFIT_SAMPLES = 128  # inputs the closed-form refit of a block's gains and biases sums over
FALLBACK_DEPTH = 1  # without repeated blocks, the top-level children (with parameters) are the blocks


# -- which blocks ------------------------------------------------------------------------------
def _is_block_list(m: nn.Module) -> bool:
    """A Sequential/ModuleList of repeated composite modules (ResNet's layerN, timm's blocks, encoder.layer)."""
    children = list(m.children())
    return (
        isinstance(m, (nn.Sequential, nn.ModuleList))
        and len(children) > 0
        and len({type(c) for c in children}) == 1
        and not isinstance(children[0], LEAVES)
        and next(children[0].children(), None) is not None
        and next(children[0].parameters(), None) is not None
    )


def find_blocks(model: nn.Module) -> list[str]:
    """The names of ``model``'s residual blocks or transformer layers (the children of every
    Sequential/ModuleList of repeated composite modules, the finest such: timm's
    ``stages.N.blocks.M`` rather than ``stages.N``), and of the linear and conv layers outside
    them (a stem, a classifier), in definition order; without repeated blocks, the top-level
    children that have parameters."""

    def expand(blocks: nn.Module, path: str) -> list[tuple[str, bool]]:
        found: list[tuple[str, bool]] = []
        for sub, block in blocks.named_children():
            name = f"{path}.{sub}"
            if _is_block_list(block):
                found += expand(block, name)
            else:
                inner = walk(block, name)
                found += inner if any(composite for _, composite in inner) else [(name, True)]
        return found

    def walk(module: nn.Module, prefix: str) -> list[tuple[str, bool]]:
        """(name, is a composite block) pairs under ``module``."""
        found: list[tuple[str, bool]] = []
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if _is_block_list(child):
                found += expand(child, path)
            elif isinstance(child, tuple(LAYERS)):
                found.append((path, False))
            else:
                found += walk(child, path)
        return found

    found = walk(model, "")
    if not any(composite for _, composite in found):
        return [n for n, c in model.named_children() if next(c.parameters(), None) is not None]
    return [name for name, _ in found]


# -- outlining blocks of a flat fx graph ---------------------------------------------------------
def _in_block(node: fx.Node, block: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values()]
    if node.op == "call_module":
        paths.append(node.target)
    return any(p == block or p.startswith(block + ".") for p in paths)


def _outline(gm: fx.GraphModule, blocks: Sequence[str]) -> tuple[fx.GraphModule, dict[str, fx.GraphModule]]:
    """A copy of ``gm`` in which each block (a module path relative to ``gm``, inlined in its graph)
    is one call of its own GraphModule; both share ``gm``'s parameters. Returns (copy, block modules)."""
    nodes = list(gm.graph.nodes)
    members = {b: [n for n in nodes if n.op not in ("placeholder", "output", "get_attr") and _in_block(n, b)]
               for b in blocks}  # fmt: skip
    subs: dict[str, fx.GraphModule] = {}
    start: dict[fx.Node, str] = {}
    for block, inside in members.items():
        if not inside:
            raise ValueError(f"block {block!r} runs no operation in the traced network")
        first, last = nodes.index(inside[0]), nodes.index(inside[-1])
        stray = [n for n in nodes[first : last + 1] if n not in inside and n.op != "get_attr"]
        if stray:
            raise ValueError(f"block {block!r} is interleaved with {stray[0].name}; give blocks that run as one piece")
        subs[block] = _subgraph(gm, inside)
        start[inside[0]] = block
    skip = {n for inside in members.values() for n in inside}
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    for node in nodes:
        if node in start:
            block = start[node]
            target = "_block_" + block.replace(".", "_")
            attrs[target] = subs[block]
            call = graph.call_module(target, tuple(env[n] for n in subs[block].inputs))
            env[members[block][-1]] = call  # (checked in _subgraph: the block's only value used outside)
        elif node not in skip:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op in ("call_module", "get_attr"):
                attrs[node.target] = fetch(gm, node.target)
    return fx.GraphModule(attrs, graph, type(gm).__name__), subs


def _subgraph(gm: fx.GraphModule, inside: list[fx.Node]) -> fx.GraphModule:
    """The nodes ``inside`` as a GraphModule of their own; ``.inputs`` lists the outer nodes it takes."""
    members = set(inside)
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(outputs) != 1 or outputs[0] is not inside[-1]:
        raise ValueError(f"a block must give one value to the rest of the network, got {[n.name for n in outputs]}")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def value(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "get_attr":  # parameters stay attributes, not inputs
                env[n] = graph.get_attr(n.target)
            else:
                inputs.append(n)
                env[n] = graph.placeholder(f"input_{len(inputs)}")
        return env[n]

    for node in inside:
        for arg in node.all_input_nodes:
            if arg not in members:
                value(arg)
        env[node] = graph.node_copy(node, value)
    graph.output(env[inside[-1]])
    sub = fx.GraphModule(gm, graph, "Block")
    sub.inputs = inputs
    return sub


class _Staged:
    """The converted and original networks arranged so that each block is one module call:
    ``run`` is the converted network to run, ``converted[name]`` and ``original[name]`` the block
    modules. Blocks inlined in an fx graph are outlined; nested graphs are swapped in place until
    ``close()``."""

    def __init__(self, converted: nn.Module, original: nn.Module, blocks: Sequence[str]) -> None:
        self.run, self.converted, self.original, self.sources = converted, {}, {}, {}
        self.norms: dict[str, nn.Module] = {}
        self._swapped: list[tuple[str, nn.Module]] = []
        self._model = converted
        called = _called(converted, blocks)
        inlined: dict[str, list[str]] = {}  # graph module path -> blocks inlined in it
        for name in blocks:
            if name in called:
                layer, source = converted.get_submodule(name), original.get_submodule(name)
                norm = layer.__dict__.get("_stripped_norm", (None, None))[1]  # convert stripped it after this layer
                self.converted[name], self.original[name] = (
                    layer,
                    source if norm is None else nn.Sequential(source, norm),
                )
                self.sources[name], self.norms[name] = source, norm
                continue
            owner = _graph_owner(converted, name)
            if owner is None:
                raise ValueError(f"block {name!r} is never called by the converted network")
            inlined.setdefault(owner, []).append(name)
        try:
            for owner, names in inlined.items():
                relative = [n[len(owner) + 1 :] if owner else n for n in names]
                staged, subs = _outline(converted.get_submodule(owner), relative)
                source = original.get_submodule(owner)
                _, original_subs = _outline(_traced(source), relative)
                for name, rel in zip(names, relative):
                    if len(subs[rel].inputs) != len(original_subs[rel].inputs):
                        raise ValueError(f"block {name!r} takes different inputs in the converted and original graphs")
                    self.converted[name], self.original[name] = subs[rel], original_subs[rel]
                    self.sources[name] = original_subs[rel]
                if owner:
                    self._swapped.append((owner, converted.get_submodule(owner)))
                    converted.set_submodule(owner, staged)
                else:
                    self.run = staged
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for owner, module in reversed(self._swapped):
            self._model.set_submodule(owner, module)
        self._swapped.clear()


def _traced(module: nn.Module) -> fx.GraphModule:
    mode = module.training
    module.eval()
    try:
        return trace(module)
    finally:
        module.train(mode)


def _graph_owner(model: nn.Module, name: str) -> str | None:
    """The path of the innermost GraphModule above ``name`` (``""`` for the root), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:i])
        if isinstance(model.get_submodule(path), fx.GraphModule):
            return path
    return None


def _called(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """The blocks that are modules with a forward of their own (not the bare containers fx leaves
    where it inlined a module's code into its parent's graph)."""
    names = []
    for name in blocks:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"no module named {name!r} in the converted network") from err
        if type(module).forward is not nn.Module.forward:
            names.append(name)
    return names


@torch.no_grad()
def _call_order(model: nn.Module, names: Sequence[str], inputs: tuple) -> list[str]:
    """``names`` in the order ``model`` first calls them on ``inputs``."""
    order: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: None if n in order else order.append(n))
        for n in names
    ]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order + [n for n in names if n not in order]


# -- data ---------------------------------------------------------------------------------------
def _batches(data, batch_size: int, max_samples: int, device: torch.device) -> list[tuple]:
    """Up to ``max_samples`` inputs from ``data`` (a data spec, Dataset, DataLoader, a tensor of
    inputs or an iterable of batches; labels, if any, are ignored), as a list of input tuples of at most ``batch_size``."""
    if isinstance(data, str):
        data = load_data(data)
    if isinstance(data, Tensor):  # one batch of inputs
        data = [data]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size)
    elif isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size)
    out, seen = [], 0
    for batch in data:
        inputs = batch_inputs(batch)
        take = min(max_samples - seen, inputs[0].shape[0])
        for i in range(0, take, batch_size):
            out.append(tuple(t[i : min(take, i + batch_size)].to(device) for t in inputs))
        seen += take
        if seen >= max_samples:
            break
    if not out:
        raise ValueError("reconstruct got no data: give a Dataset, DataLoader or batches of inputs")
    return out


def _caches_off(*models: nn.Module) -> list[tuple[object, bool]]:
    """Turn off a transformers model's key/value cache (``config.use_cache``): a cache in a block's
    captured inputs would grow at every step trained on it. Returns what to put back."""
    configs = {id(c): c for m in models if hasattr(c := getattr(m, "config", None), "use_cache")}
    saved = [(c, c.use_cache) for c in configs.values()]
    for config, _ in saved:
        config.use_cache = False
    return saved


def _rank_share(batches: list[tuple]) -> list[tuple]:
    """Under torchrun, this rank's share of the batches (every rank the same number of them, since
    each step is a collective); else all of them."""
    rank, world = rank_and_world()
    if world == 1:
        return batches
    if len(batches) < world:
        raise ValueError(f"reconstruct got {len(batches)} batches for {world} ranks: give at least one batch per rank")
    return batches[rank : len(batches) // world * world : world]


def _check_sharding(converted: nn.Module, blocks: Sequence[str], offload: bool) -> None:
    """FSDP2: each block must be a ``fully_shard``-ed module of its own, since it is called (and its
    gradients reduced) on its own; a block whose weights an enclosing module shards cannot be."""
    if not fsdp_modules(converted):
        return
    if offload:
        raise ValueError("offload=True moves whole blocks between devices; a model sharded with FSDP2 cannot be offloaded")
    for name in blocks:
        block = converted.get_submodule(name)
        if any(isinstance(p, DTensor) for p in block.parameters()) and not isinstance(block, FSDPModule):
            raise ValueError(
                f"block {name!r} is sharded by an enclosing module: shard it with fully_shard(model.get_submodule({name!r})) "
                "before the model, or leave it out of blocks="
            )


# -- fitting ------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _capture(run: nn.Module, block: nn.Module, batches: list[tuple]) -> list:
    """What ``run`` feeds ``block`` on each batch (its args and kwargs), stopping each pass there."""
    captured: list = []

    def hook(module, args, kwargs):
        captured.append((_detach(args), _detach(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for inputs in batches:
                try:
                    run(*inputs)
                except _Stop:
                    continue
                raise ValueError("a block was not reached by the converted network's forward pass")
    finally:
        handle.remove()
    return captured


class _Feeds:
    """What the converted network feeds each block, block after block. Where the network to run is
    one graph that calls every block as a module (the outlined case), it is interpreted node by node
    and each batch's pass waits at the next block, so the network runs once in all, through each
    block as trained; else each block's inputs come from a pass from the start (:func:`_capture`)."""

    def __init__(self, run: nn.Module, blocks: dict[str, nn.Module], batches: list[tuple]) -> None:
        self.run, self.blocks, self.batches = run, blocks, batches
        self.nodes: dict[str, fx.Node] = {}
        if isinstance(run, fx.GraphModule):
            calls = {n.target: n for n in run.graph.nodes if n.op == "call_module"}
            for name, block in blocks.items():
                node = next((n for t, n in calls.items() if run.get_submodule(t) is block), None)
                if node is None:
                    break
                self.nodes[name] = node
        self.stepping = len(self.nodes) == len(blocks)
        self.passes = [_Pass(run, inputs) for inputs in batches] if self.stepping else []

    @torch.no_grad()
    def inputs(self, name: str) -> list[tuple[tuple, dict]]:
        """Block ``name``'s (args, kwargs) on each batch; blocks are asked for in the order they run."""
        if not self.stepping:
            return _capture(self.run, self.blocks[name], self.batches)
        return [run.until(self.nodes[name]) for run in self.passes]


class _Pass(fx.Interpreter):
    """One batch's pass through a graph, run up to a node and resumed from there later, when that
    node (a block, trained meanwhile) runs first; each value is freed after its last use."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple) -> None:
        super().__init__(gm)
        self.env, self.args_iter = {}, iter(inputs)
        self.order, self.pending = iter(gm.graph.nodes), None
        self.last_uses: dict[fx.Node, list[fx.Node]] = {}
        seen: set[fx.Node] = set()
        for node in reversed(gm.graph.nodes):
            for used in node.all_input_nodes:
                if used not in seen:
                    seen.add(used)
                    self.last_uses.setdefault(node, []).append(used)

    def until(self, stop: fx.Node) -> tuple[tuple, dict]:
        """Run every node before ``stop``; the (args, kwargs) it will be called with."""
        if self.pending is not None:
            self.step(self.pending)
        for node in self.order:
            if node is stop:
                self.pending = node
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                return _detach(args), _detach(kwargs)
            self.step(node)
        raise ValueError(f"the converted network's graph never reaches {stop.name}")

    def step(self, node: fx.Node) -> None:
        self.env[node] = self.run_node(node)
        for used in self.last_uses.get(node, ()):
            self.env.pop(used, None)


@torch.no_grad()
def _activations(model: nn.Module, names: Sequence[str], batches: list[tuple]) -> dict[str, list]:
    """The first output of each module in ``names`` on each batch, in one pass per batch."""
    found: dict[str, list] = {name: [] for name in names}
    done = [0]  # batches run so far: a module called twice in a pass keeps its first output

    def keep(name):
        def hook(module, args, out):
            if len(found[name]) == done[0]:
                found[name].append(_detach(out))

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        for inputs in batches:
            model(*inputs)
            done[0] += 1
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, outs in found.items() if len(outs) != len(batches)]
    if missing:
        raise ValueError(f"block {missing[0]!r} was not reached by the original network's forward pass")
    return found


def _moved(tree, device: torch.device):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


def _detach(tree):
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _leaves(out) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


def _mse(out, target) -> Tensor:
    pairs = list(zip(_leaves(out), _leaves(target)))
    return sum(F.mse_loss(o.float(), t.float()) for o, t in pairs) / len(pairs)


@torch.no_grad()
def _mean_loss(block: nn.Module, captured, targets, autocast) -> tuple[float, float]:
    """The block's mean MSE to its targets, and the mean cosine of each sample's output with its target."""
    sums = {"mse": 0.0, "cosine": 0.0, "samples": 0, "batches": len(captured)}
    for (args, kwargs), target in zip(captured, targets):
        with autocast:
            out = block(*args, **kwargs)
        sums["mse"] += _mse(out, target).item()
        o, t = _leaves(out)[0].flatten(1).double(), _leaves(target)[0].flatten(1).double()
        sums["cosine"] += F.cosine_similarity(o, t, dim=1).sum().item()
        sums["samples"] += len(o)
    sums = all_sum(sums)  # under torchrun: over every rank's batches, so every rank decides alike
    return sums["mse"] / sums["batches"], sums["cosine"] / sums["samples"]


@torch.no_grad()
def _refit(block: nn.Module, source: nn.Module, captured: list[tuple[tuple, dict]]) -> None:
    """Calibration inside the block: each cosine layer call's gain and bias refitted by least squares,
    as :func:`cosconvert.calibrate` does, to the original layer (and any normalizer folded into it)
    on the inputs the reconstructed prefix now feeds it. Layers whose weights no longer are the
    original's (trained before) are left alone."""
    originals = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in source.named_parameters()}
    only, targets = set(), {}
    for name, weight in block.named_parameters():
        owner, _, attr = name.rpartition(".")
        original = originals.get(name)
        if attr != "weight" or original is None or not torch.equal(weight, original):
            continue
        only.add(id(weight))
        layer = block.get_submodule(owner)
        norm = layer.__dict__.get("_stripped_norm", (None, None))[1]
        targets[id(weight)] = (originals.get(f"{owner}.bias" if owner else "bias"), norm)
    fits = LayerFits(block, only=only, targets=targets)
    taken = 0
    with CF.observing(fits):
        for args, kwargs in captured:  # a few batches fix a gain per unit; more only cost time
            block(*args, **kwargs)
            taken += len(_leaves(args)[0])
            if taken >= REFIT_SAMPLES:
                break
    fits.settle()


def _fit_block(
    block, original_block, source, captured, targets, *, steps, lr, train, refit, plateau, autocast, scaler, progress,
    desc,
) -> dict:
    started = time.perf_counter()
    if targets is None:
        with torch.no_grad(), autocast:
            targets = [_detach(original_block(*args, **kwargs)) for args, kwargs in captured]
    power = sum(sum(t.float().pow(2).mean().item() for t in _leaves(x)) / len(_leaves(x)) for x in targets)
    totals = all_sum({"power": power, "batches": len(targets)})  # under torchrun: every rank's targets
    power = totals["power"] / totals["batches"]
    before, cosine_before = _mean_loss(block, captured, targets, autocast)
    snapshot = [p.detach().clone() for p in block.parameters()]
    refit_started = time.perf_counter()
    if refit:
        with whole_parameters(block):  # FSDP2: the fit writes whole gains, scattered back into the shards
            _refit(block, source, captured)
    refit_seconds = time.perf_counter() - refit_started
    params = [
        p for n, p in block.named_parameters() if p.requires_grad and (train == "all" or n.endswith(("gain", "bias")))
    ]
    exact = before <= 1e-10 * power  # nothing converted in it, or already reproduced: no step would help
    if not params or steps == 0 or exact:
        after, cosine_after = _mean_loss(block, captured, targets, autocast)
        return {"loss_before": before, "loss_after": after, "target_power": power, "cosine_before": cosine_before,
                "cosine_after": cosine_after, "steps": 0, "parameters": 0, "refit_seconds": round(refit_seconds, 3),
                "train_seconds": 0.0, "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(captured)).tolist()
    train_started = time.perf_counter()
    window = min(50, max(10, len(captured)))  # steps whose mean loss is compared with the window before
    losses: list[float] = []
    taken = steps
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for step in range(steps):
            if step and step % len(captured) == 0:
                order = torch.randperm(len(captured)).tolist()
            i = order[step % len(captured)]
            args, kwargs = captured[i]
            with autocast:
                loss = _mse(block(*args, **kwargs), targets[i])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            average_gradients(params)  # under torchrun, a replicated block learns from every rank's batch
            scaler.step(opt)
            scaler.update()
            sched.step()
            bar.update(1)
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3g}")
            if plateau and len(losses) >= 2 * window and len(losses) % window == 0:
                windows = all_sum({"now": sum(losses[-window:]), "then": sum(losses[-2 * window : -window])})
                now, then = windows["now"], windows["then"]
                if then - now < plateau * then:  # the loss stopped falling: the rest of the steps are wasted
                    taken = step + 1
                    break
    train_seconds = time.perf_counter() - train_started
    after, cosine_after = _mean_loss(block, captured, targets, autocast)
    if after > before:  # never leave a block worse than it came: put its parameters back
        with torch.no_grad():
            for p, saved in zip(block.parameters(), snapshot):
                p.copy_(saved)
        after, cosine_after = before, cosine_before
    return {"loss_before": before, "loss_after": after, "target_power": power, "cosine_before": cosine_before,
            "cosine_after": cosine_after, "steps": taken, "parameters": sum(p.numel() for p in params),
            "refit_seconds": round(refit_seconds, 3), "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def reconstruct(
    converted: nn.Module,
    original: nn.Module,
    data: str | Tensor | Dataset | DataLoader | Iterable,
    *,
    blocks: str | Sequence[str] = "auto",
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 32,
    max_samples: int = 512,
    train: str = "all",
    refit: bool = True,
    plateau: float = 0.01,
    target: str = "network",
    amp: str | None = "auto",
    device: str | torch.device | None = None,
    offload: bool = False,
    verbose: bool = False,
) -> dict:
    """Train each block of ``converted`` in place, in order, to reproduce ``original``'s block on the
    inputs the converted network feeds it. Returns (and stores in the conversion report) per block the
    mean MSE before and after, the target's mean square, the steps, the parameters trained and the time.

    Args:
        data: inputs (labels ignored) as for :func:`cosconvert.finetuning.finetune`: a Dataset, a
            DataLoader, a tensor of inputs, batches of inputs or (inputs, labels), or a data spec
            (``"digits"``, ``x.npz``, as :func:`cosconvert.data.load_data`).
        blocks: ``"auto"`` (:func:`find_blocks` on ``original``), module names, e.g. ``["layer1.0", "fc"]``,
            or one name (``"layer1"``).
        steps: the most optimizer steps per block, each on one batch of ``batch_size`` of the ``max_samples``
            inputs.
        plateau: a block stops early once the mean loss of its last window of steps (one pass over the
            batches, 10 to 50 steps) falls by less than this fraction of the window's before; 0 runs all steps.
        lr: Adam's learning rate (cosine schedule to 0 over each block's steps).
        train: ``"all"`` parameters of the block, or ``"affine"`` (only gains and biases).
        target: what each block learns to output: ``"network"``, the original network's activation
            there on the same images (so errors made before the block are corrected, not carried on), or
            ``"block"``, the original block applied to what the converted network feeds it.
        refit: first refit the block's gains and biases in closed form, as :func:`cosconvert.calibrate`
            does, on (up to 128 of) the inputs the reconstructed prefix feeds it (a block is never left worse than before).
        amp: autocast dtype, ``"bf16"``, ``"fp16"`` (with a gradient scaler) or None (float32), on any
            device. ``"auto"``: bf16 on CUDA, float32 elsewhere (a CPU without native bfloat16 runs it
            slower than float32). Norms are taken in float32 either way.
        device: where to run (both models are moved there); default: where ``converted`` is.
        offload: keep both models on the CPU and move one block at a time, with the inputs and targets
            captured for it, to ``device`` to fit it, then back: a network larger than the device's memory
            can be recovered. The networks' own passes (each block's inputs, the original's activations)
            run on the CPU.
        verbose: a progress bar per block (on stderr).

    Under torchrun every rank passes the same ``data`` and trains on its share of the batches: the
    gradients, losses and refit statistics are reduced over the ranks, so every rank ends with the
    blocks one process would fit on all the batches. Either network may be replicated or sharded with
    FSDP2 (``fully_shard``); sharded, each block must be a ``fully_shard``-ed module of its own.
    """
    started = time.perf_counter()
    if target not in ("network", "block"):
        raise ValueError(f"target must be 'network' or 'block', got {target!r}")
    if train not in ("all", "affine"):
        raise ValueError(f"train must be 'all' or 'affine', got {train!r}")
    device = torch.device(device) if device is not None else next(converted.parameters()).device
    amp, autocast, scaler = mixed_precision(amp, device)
    home = torch.device("cpu") if offload else device  # where the networks stay
    converted.to(home), original.to(home)
    names = find_blocks(original) if blocks == "auto" else [blocks] if isinstance(blocks, str) else list(blocks)
    overlapping = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if overlapping:
        raise ValueError(f"blocks overlap: {overlapping[0][0]!r} contains {overlapping[0][1]!r}; give disjoint blocks")
    batches = _rank_share(_batches(data, batch_size, max_samples, home))
    _check_sharding(converted, names, offload)
    modes = converted.training, original.training
    converted.eval(), original.eval()  # normalizers keep their statistics, dropout is off
    caches = _caches_off(converted, original)
    staged, rows = None, []
    try:
        staged = _Staged(converted, original, names)
        names = _call_order(original, names, batches[0])
        feeds = _Feeds(staged.run, {name: staged.converted[name] for name in names}, batches)
        # target="network": the original network's own activations at every block, in one pass
        activations = _activations(original, names, batches) if target == "network" else {}
        target_seconds = time.perf_counter() - started
        overall = tqdm(names, desc="reconstruct", unit="block", disable=not verbose)
        for i, name in enumerate(overall):
            fed = time.perf_counter()
            captured = feeds.inputs(name)
            feed_seconds = time.perf_counter() - fed
            targets = activations.pop(name, None)  # None: the original block on the converted network's inputs
            norm = staged.norms.get(name)
            if targets is not None and norm is not None:
                with torch.no_grad():
                    for j, t in enumerate(targets):  # in place: one batch more at a time, not a second set
                        targets[j] = norm(t)
            modules = (staged.converted[name], staged.original[name], staged.sources[name])
            if offload:  # this block alone, and what it is fitted on, go to the device
                captured, targets = _moved(captured, device), _moved(targets, device)
                for module in modules:
                    module.to(device)
            row = _fit_block(*modules, captured, targets, steps=steps, lr=lr,
                             train=train, refit=refit, plateau=plateau, autocast=autocast, scaler=scaler, progress=verbose,
                             desc=f"block {i + 1}/{len(names)} {name}")  # fmt: skip
            if offload:
                for module in modules:
                    module.to(home)
                row["offloaded"] = sum(p.numel() * p.element_size() for p in modules[0].parameters())
            row["feed_seconds"] = round(feed_seconds, 3)
            rows.append(
                {"block": name, **{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}}
            )
            overall.set_postfix(block=name, cosine=f"{row['cosine_after']:.3f}")
            del captured, targets
        overall.close()
    finally:
        if staged is not None:
            staged.close()
        converted.train(modes[0]), original.train(modes[1])
        for config, use_cache in caches:
            config.use_cache = use_cache
    samples = int(all_sum({"n": sum(b[0].shape[0] for b in batches)})["n"])  # under torchrun: every rank's
    result = {"samples": samples, "batch_size": batch_size, "lr": lr, "train": train,
              "amp": amp, "offload": offload, "seconds": round(time.perf_counter() - started, 3),
              "time": {"original activations": round(target_seconds, 3),
                       "feeding blocks": round(sum(r["feed_seconds"] for r in rows), 3),
                       "refit": round(sum(r["refit_seconds"] for r in rows), 3),
                       "training": round(sum(r["train_seconds"] for r in rows), 3)},
              "blocks": rows}  # fmt: skip
    report = getattr(converted, "cosine_report", None)
    if report is not None:
        report.reconstruction = result
    return result
