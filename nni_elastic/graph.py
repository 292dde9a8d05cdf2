"""Channel groups on ``torch_pruning.DependencyGraph``, importance ranking and reorder.

A *channel group* is a set of coupled channels found by torch-pruning's dependency graph
(DepGraph, Fang et al., CVPR 2023): a conv's output channels, the BatchNorm after it, the input
channels of every consumer, and every member of a residual sum or a concatenation. Each group is
one elastic dimension: a level keeps the first ``k`` channels of the group in every member.

Channels are reordered once so that the most important come first; a reorder is a permutation of
every member of the group, so the network function is unchanged.

Example:
    >>> graph = build_channel_graph(model, torch.randn(1, 3, 32, 32))
    >>> reorder_channels(model, graph, rank_channels(graph, "l1"))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from ._registry import Registry

__all__ = [
    "ChannelGroup",
    "ChannelGraph",
    "Member",
    "UnsupportedModuleError",
    "IMPORTANCES",
    "build_channel_graph",
    "create_importance",
    "rank_channels",
    "reorder_channels",
    "keep_indices",
]

logger = logging.getLogger(__name__)

# Ops that carry channels through without parameters of their own.
_PASS_THROUGH = {ops.OPTYPE.CONCAT, ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE, ops.OPTYPE.EXPAND}
_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
SUPPORTED_TEXT = "Conv1d, Conv2d (groups=1 or depthwise), Linear, BatchNorm1d, BatchNorm2d"


class UnsupportedModuleError(ValueError):
    """A module inside an elastic channel group cannot be sliced; the message says how to fix it."""


@dataclass(frozen=True)
class Member:
    """One tensor dimension of one module that a channel group spans.

    Attributes:
        module: dotted module path inside the model.
        dim: ``"out"`` (output channels; BatchNorm and depthwise convs only have this) or ``"in"``.
        positions: ``positions[r]`` lists the indices this member uses for root channel ``r``
            (more than one when a flatten spreads a channel over several features).
    """

    module: str
    dim: str
    positions: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    """A set of coupled channels, named after its root module (the first producer found)."""

    name: str
    size: int
    members: list[Member]
    tp_group: object = field(default=None, repr=False, compare=False)


@dataclass
class ChannelGraph:
    """The elastic channel groups of a model plus the full size of every sliced dimension."""

    groups: list[ChannelGroup]
    dims: dict[tuple[str, str], int]
    fixed: list[str]

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups)
        raise ValueError(f"unknown channel group {name!r}; groups of this model: {known}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]


def _module_names(model: nn.Module) -> dict[object, str]:
    names: dict[object, str] = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    return names


def _resolve_ignored(model: nn.Module, ignored: Iterable[Union[str, nn.Module]]) -> list[str]:
    names = _module_names(model)
    known = {n for n, _ in model.named_modules()}
    out = []
    for item in ignored:
        if isinstance(item, nn.Module):
            if item not in names:
                raise ValueError(f"ignored_layers contains a module that is not part of the model: {item!r}")
            out.append(names[item])
        elif isinstance(item, str):
            if item not in known:
                raise ValueError(
                    f"ignored_layers entry {item!r} is not a module path of the model; "
                    f"use names from model.named_modules(), e.g. {sorted(known - {''})[:5]}"
                )
            out.append(item)
        else:
            raise ValueError(f"ignored_layers entries must be module paths or modules, got {item!r}")
    return out


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _member_dim(dg: tp.DependencyGraph, module: nn.Module, handler: Callable) -> str:
    pruner = dg.get_pruner_of_module(module)
    return "out" if handler == pruner.prune_out_channels else "in"


def _check_module(name: str, module: object, root: str, model: nn.Module | None = None) -> None:
    fix = (
        f"keep this group at full width with ElasticModel(..., ignored_layers=[{root!r}])"
        f" (supported inside elastic groups: {SUPPORTED_TEXT})"
    )
    if isinstance(module, nn.Parameter):
        owner_path = name.rpartition(".")[0]
        owner = model.get_submodule(owner_path) if model is not None else None
        where = f"of module {owner_path!r} ({type(owner).__name__})" if owner_path and owner is not None else "of the model"
        raise UnsupportedModuleError(
            f"parameter {name!r} {where} is a bare nn.Parameter used in forward; it is coupled to channel "
            f"group {root!r} and cannot be sliced; {fix}, or wrap it in a supported layer"
        )
    if not isinstance(module, _SUPPORTED):
        raise UnsupportedModuleError(
            f"module {name!r} ({type(module).__name__}) is coupled to channel group {root!r} and "
            f"cannot be sliced; {fix}"
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        depthwise = module.groups == module.out_channels == module.in_channels
        if module.groups != 1 and not depthwise:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}, groups={module.groups}) is a grouped "
                f"convolution; only groups=1 and depthwise convolutions can be sliced; {fix}"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) uses padding_mode="
                f"{module.padding_mode!r}; only 'zeros' is supported; {fix}"
            )


def build_channel_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignored_layers: Iterable[Union[str, nn.Module]] = (),
) -> ChannelGraph:
    """Trace ``model`` with torch-pruning and return its elastic channel groups.

    Groups coupled to the model output (the classifier) and groups whose producer lies under an
    ``ignored_layers`` path keep their full width and are listed in ``ChannelGraph.fixed``.

    Args:
        model: any CNN torch-pruning can trace.
        example_inputs: a batch (or tuple of inputs) used for tracing.
        ignored_layers: module paths (or modules) whose output channels never shrink.

    Raises:
        UnsupportedModuleError: a module in an elastic group cannot be sliced; the message names
            its path and type and the ``ignored_layers`` entry that avoids it.
    """
    ignored = _resolve_ignored(model, ignored_layers)
    names = _module_names(model)
    was_training = model.training
    dg = tp.DependencyGraph()
    try:
        with torch.inference_mode(False), torch.enable_grad():  # torch-pruning traces through autograd
            dg.build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # tracing runs user code; name what failed
        raise ValueError(
            f"torch-pruning could not trace {type(model).__name__} with example inputs of shape "
            f"{_shape_of(example_inputs)}: {exc}"
        ) from exc
    finally:
        model.train(was_training)

    groups: list[ChannelGroup] = []
    fixed: list[str] = []
    dims: dict[tuple[str, str], int] = {}
    seen_out: set[str] = set()
    problems: list[tuple[str, object]] = []  # (group root, unsupported member): reported together
    for module in list(dg.module2node):
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) or names.get(module) in seen_out:
            continue
        root = names[module]
        pruner = dg.get_pruner_of_module(module)
        size = pruner.get_out_channels(module)
        tp_group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        members, coupled_to_output, touches_ignored, unsupported = [], False, False, None
        for item in tp_group:
            dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
            target = dep.target
            tname = names.get(target.module, str(target.module))
            dim = _member_dim(dg, target.module, dep.handler) if isinstance(target.module, nn.Module) else "out"
            terminal = not target.outputs  # nothing consumes it: it is (part of) the model output
            if target.type == ops.OPTYPE.OUTPUT or (terminal and (dim == "out" or target.type in _PASS_THROUGH)):
                coupled_to_output = True
            if target.type in _PASS_THROUGH or target.type == ops.OPTYPE.OUTPUT:
                continue
            if dim == "out":
                seen_out.add(tname)
                touches_ignored |= _under(tname, ignored)
            if target.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND):
                unsupported = unsupported or (tname, f"channel {target.type.name.lower()} op")
                continue
            try:
                _check_module(tname, target.module, root, model)
            except UnsupportedModuleError as exc:
                unsupported = unsupported or exc
                continue
            positions: list[list[int]] = [[] for _ in range(size)]
            for i, r in zip(idxs, root_idxs):
                positions[r].append(i)
            members.append(Member(tname, dim, tuple(tuple(p) for p in positions)))
        if coupled_to_output or touches_ignored:
            fixed.append(root)
            continue
        if unsupported is not None:
            problems.append((root, unsupported))
            continue
        groups.append(ChannelGroup(root, size, members, tp_group))
        for m in members:
            mod = model.get_submodule(m.module)
            dims[(m.module, m.dim)] = _full_size(mod, m.dim)
    if problems:
        raise _unsupported_error(problems)
    return ChannelGraph(groups, dims, fixed)


def _unsupported_error(problems: list[tuple[str, object]]) -> UnsupportedModuleError:
    """The first problem's message, suggesting ``ignored_layers`` for every group that needs it."""
    root, first = problems[0]
    if isinstance(first, UnsupportedModuleError):
        message = str(first)
    else:
        message = (
            f"{first[1]} {first[0]!r} splits channel group {root!r}; elastic slicing "
            f"needs whole groups; keep it at full width with ElasticModel(..., ignored_layers=[{root!r}])"
        )
    roots = list(dict.fromkeys(r for r, _ in problems))
    if len(roots) > 1:  # e.g. a grouped conv is in its input's group and heads its own
        message = message.replace(f"ignored_layers=[{root!r}]", f"ignored_layers={roots!r}")
    return UnsupportedModuleError(message)


def _shape_of(inputs: object) -> object:
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape)
    if isinstance(inputs, (list, tuple)):
        return [_shape_of(x) for x in inputs]
    return type(inputs).__name__


def _full_size(module: nn.Module, dim: str) -> int:
    weight = module.weight if getattr(module, "weight", None) is not None else module.running_mean
    return weight.shape[0] if dim == "out" else weight.shape[1]


# --------------------------------------------------------------------------- importance

ImportanceFn = Callable[[object], torch.Tensor]
IMPORTANCES: Registry[Callable[[], ImportanceFn]] = Registry("importance")
IMPORTANCES.register("l1")(lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2")(lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("bn")(lambda: tp.importance.BNScaleImportance())
IMPORTANCES.register("fpgm")(lambda: tp.importance.FPGMImportance())
IMPORTANCES.register("lamp")(lambda: tp.importance.LAMPImportance())
IMPORTANCES.register("taylor")(lambda: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random")(lambda: tp.importance.RandomImportance())

#: criteria that read ``.grad`` and need a backward pass on data first
GRADIENT_IMPORTANCES = {"taylor"}


def create_importance(importance: Union[str, ImportanceFn]) -> ImportanceFn:
    """Return a torch-pruning importance callable for a name, or pass a user callable through.

    A user callable receives a torch-pruning ``Group`` with full indices and returns one score
    per root channel (higher = more important).
    """
    if callable(importance):
        return importance
    return IMPORTANCES.get(importance)()


def rank_channels(
    graph: ChannelGraph,
    importance: Union[str, ImportanceFn] = "l1",
) -> dict[str, torch.Tensor]:
    """Score every channel of every elastic group; returns ``{group: scores}`` (length ``size``).

    Gradient-based criteria (``"taylor"``) read ``.grad``: run a backward pass first.
    """
    scorer = create_importance(importance)
    fallback = None
    scores: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        with torch.no_grad():
            s = scorer(g.tp_group)
        if s is None:  # e.g. BN-scale importance on a group without BatchNorm
            fallback = fallback or create_importance("l1")
            with torch.no_grad():
                s = fallback(g.tp_group)
        s = torch.as_tensor(s).detach().flatten().float().cpu()
        if s.numel() != g.size:
            raise ValueError(
                f"importance for group {g.name!r} returned {s.numel()} scores, expected {g.size}"
            )
        scores[g.name] = torch.nan_to_num(s, nan=0.0)
    return scores


# --------------------------------------------------------------------------- reorder


def _member_tensors(module: nn.Module, dim: str) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs that index the member's channels along ``dim``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = [(t, 0) for t in (module.weight, module.bias, module.running_mean, module.running_var) if t is not None]
        out += [(t, 1) for t in (getattr(module, "level_running_mean", None), getattr(module, "level_running_var", None)) if t is not None]
        return out
    if dim == "out":
        return [(t, 0) for t in (module.weight, module.bias) if t is not None]
    return [(module.weight, 1)]


def reorder_channels(
    model: nn.Module,
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    prefix: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Permute every member of every group so that channels come in descending score order.

    Function-preserving: the model computes the same outputs afterwards (up to float rounding).

    Args:
        model: the traced model (modified in place).
        graph: its channel graph.
        scores: ``{group: per-channel score}`` from :func:`rank_channels`.
        prefix: optional ``{group: k}``; only the first ``k`` channels are reordered (used to re-rank
            inside a nested level without disturbing the channels outside it).

    Returns:
        ``{group: perm}`` where new channel ``i`` is old channel ``perm[i]``.
    """
    perms: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.name not in scores:
            continue
        k = g.size if prefix is None else int(prefix.get(g.name, g.size))
        s = scores[g.name][:k]
        head = torch.argsort(s, descending=True, stable=True)
        perm = torch.cat([head, torch.arange(k, g.size)])
        perms[g.name] = perm
        if torch.equal(perm, torch.arange(g.size)):
            continue
        for m in g.members:
            module = model.get_submodule(m.module)
            src = torch.tensor([i for r in perm.tolist() for i in m.positions[r]], dtype=torch.long)
            dst = torch.tensor([i for r in range(g.size) for i in m.positions[r]], dtype=torch.long)
            with torch.no_grad():
                for tensor, axis in _member_tensors(module, m.dim):
                    moved = tensor.index_select(axis, src.to(tensor.device))
                    tensor.index_copy_(axis, dst.to(tensor.device), moved)
    return perms


def keep_indices(graph: ChannelGraph, channels: Mapping[str, int]) -> dict[tuple[str, str], Union[int, torch.Tensor]]:
    """For a level ``{group: k}``, the kept indices of every sliced (module, dim).

    A contiguous prefix is returned as an ``int`` (sliced with ``narrow``, no copy); anything else
    (e.g. the input of a conv after a concatenation) as a sorted ``LongTensor``.
    """
    dropped: dict[tuple[str, str], set[int]] = {}
    for g in graph.groups:
        k = int(channels.get(g.name, g.size))
        for m in g.members:
            bucket = dropped.setdefault((m.module, m.dim), set())
            for r in range(k, g.size):
                bucket.update(m.positions[r])
    out: dict[tuple[str, str], Union[int, torch.Tensor]] = {}
    for key, full in graph.dims.items():
        gone = dropped.get(key, set())
        keep = [i for i in range(full) if i not in gone]
        out[key] = len(keep) if keep == list(range(len(keep))) else torch.tensor(keep, dtype=torch.long)
    return out
