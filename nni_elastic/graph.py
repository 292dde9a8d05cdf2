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

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils import parametrize
from torch_pruning import ops

from . import _slicing

from ._registry import Registry
from .device import module_device, to_device

__all__ = [
    "ChannelGroup",
    "ChannelGraph",
    "Member",
    "UnsupportedModuleError",
    "IMPORTANCES",
    "build_channel_graph",
    "create_importance",
    "rank_channels",
    "accumulate_gradients",
    "reorder_channels",
    "apply_permutations",
    "trace",
    "remap",
    "keep_indices",
    "unsupported_error",
    "UNSUPPORTED_MODES",
]

logger = logging.getLogger(__name__)

# Ops that carry channels through without parameters of their own.
_PASS_THROUGH = {ops.OPTYPE.CONCAT, ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE, ops.OPTYPE.EXPAND, ops.OPTYPE.SLICE}
# Ops whose channel mapping torch-pruning gets wrong or our sliced forward cannot follow (the user's
# forward holds literal sizes); their groups are refused, or kept at full width on request.
_CHANNEL_OPS = {ops.OPTYPE.SPLIT: "split/chunk", ops.OPTYPE.UNBIND: "unbind"}
_SUPPORTED = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.PReLU,
)
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)
SUPPORTED_TEXT = (
    "Conv1d/2d/3d and ConvTranspose1d/2d/3d (any groups), Linear, BatchNorm1d/2d/3d, InstanceNorm, GroupNorm, "
    "LayerNorm, PReLU, their subclasses, and bare parameters read by a module's forward"
)
#: how a group may be kept at full width instead of refusing the model
UNSUPPORTED_MODES = ("error", "keep")


class UnsupportedModuleError(ValueError):
    """A module inside an elastic channel group cannot be sliced; the message says how to fix it."""


@dataclass(frozen=True)
class Member:
    """One tensor dimension of one module that a channel group spans.

    Attributes:
        module: dotted module path inside the model.
        dim: ``"out"`` (output channels; norms and depthwise convs only have this), ``"in"``, or
            ``"param:<name>"`` for a bare parameter of ``module`` read by its forward.
        positions: ``positions[r]`` lists the indices this member uses for root channel ``r``
            (more than one when a flatten spreads a channel over several features).
        axis: the tensor axis of a bare parameter member (``None`` otherwise).
    """

    module: str
    dim: str
    positions: tuple[tuple[int, ...], ...]
    axis: Optional[int] = None


@dataclass
class ChannelGroup:
    """A set of coupled channels, named after its root module (the first producer found).

    A level keeps the root channels ``order[:k]``, with ``k`` a multiple of ``step``. The order is
    the identity unless a grouped convolution or a GroupNorm splits the channels into blocks: then
    it visits the blocks in turn, so every level keeps the same number of channels in each block.
    """

    name: str
    size: int
    members: list[Member]
    tp_group: object = field(default=None, repr=False, compare=False)
    order: list[int] = field(default_factory=list)
    step: int = 1
    cells: list[list[int]] = field(default_factory=list, repr=False)
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.order:
            self.order = list(range(self.size))
        if not self.cells:
            self.cells = [list(range(self.size))]

    def __deepcopy__(self, memo: dict) -> "ChannelGroup":
        # torch-pruning's group holds autograd nodes of the traced model (not copyable, and they
        # would point at the original modules): a copy re-traces when it needs one
        clone = copy.copy(self)
        clone.members, clone.order = list(self.members), list(self.order)
        clone.cells = [list(c) for c in self.cells]
        clone.tp_group = None
        return clone


@dataclass
class ChannelGraph:
    """The elastic channel groups of a model plus the full size of every sliced dimension.

    Attributes:
        groups: the elastic groups.
        dims: full size of every sliced ``(module, dim)``.
        fixed: roots of groups kept at full width (output-coupled, ignored, or unsupported).
        problems: ``{root: reason}`` for the groups kept at full width because they cannot be
            sliced (only with ``unsupported="keep"``).
    """

    groups: list[ChannelGroup]
    dims: dict[tuple[str, str], int]
    fixed: list[str]
    problems: dict[str, str] = field(default_factory=dict)
    axes: dict[tuple[str, str], int] = field(default_factory=dict)

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups)
        raise ValueError(f"unknown channel group {name!r}; groups of this model: {known}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def demote(self, name: str, reason: str) -> None:
        """Keep group ``name`` at full width from now on (it can no longer shrink)."""
        self.groups = [g for g in self.groups if g.name != name]
        self.fixed.append(name)
        self.problems[name] = reason
        self._index_dims()

    def _index_dims(self) -> None:
        sizes = dict(self.dims)
        self.dims = {}
        for g in self.groups:
            for m in g.members:
                self.dims[(m.module, m.dim)] = sizes[(m.module, m.dim)]


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


_KNOWN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _module_problem(name: str, module: object) -> Optional[str]:
    """Why ``module`` cannot be sliced inside an elastic group, or ``None`` if it can."""
    kind = type(module).__name__
    if not isinstance(module, _SUPPORTED):
        return f"module {name!r} ({kind}) is not a layer nni-elastic can slice (supported: {SUPPORTED_TEXT})"
    if parametrize.is_parametrized(module) or any(
        hasattr(module, f"{p}_{suffix}") for p in ("weight",) for suffix in ("g", "v", "orig")
    ):
        return (
            f"module {name!r} ({kind}) has a parametrized weight (weight_norm / spectral_norm); remove it with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') (or nn.utils.remove_weight_norm) "
            "before wrapping"
        )
    extra = [n for n, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
    extra = [n for n in extra if n not in _KNOWN_TENSORS]
    if extra:
        return (
            f"module {name!r} ({kind}) holds its own tensors {extra} besides weight/bias; nni-elastic does not know "
            "how its forward indexes them by channel"
        )
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _slicing.is_depthwise(module):
        if module.groups == module.out_channels or module.groups == module.in_channels:
            return (
                f"module {name!r} ({kind}, groups={module.groups}, in={module.in_channels}, out={module.out_channels}) "
                "is a depthwise convolution with a channel multiplier; torch-pruning cannot prune it"
            )
        if module.transposed:
            return f"module {name!r} ({kind}, groups={module.groups}) is a grouped transposed convolution"
    return None


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, with channel splits mapped by chunk index.

    torch-pruning 1.6 maps a split's outputs to chunks in the order it discovered them, not by
    chunk index, and infers the chunk sizes from that order, so ``a, b = x.chunk(2, 1)`` can
    send ``a``'s channels to ``b``'s consumer. Each output's chunk index is in the autograd graph
    (the ``output_nr`` of its edge to the split) and the sizes are saved on the split's backward
    node: the mappings are rebuilt from those. Splits that cannot be resolved are listed in
    ``dg.nni_elastic_unmapped_splits``.
    """
    dg = tp.DependencyGraph()
    device = module_device(model)  # a batch from a CPU dataset traces a model on CUDA
    if device is not None and device.type != "meta":
        example_inputs = to_device(example_inputs, device)
    with torch.inference_mode(False), torch.enable_grad():  # torch-pruning traces through autograd
        dg.build_dependency(model, example_inputs=example_inputs, verbose=False)
    remap(dg)
    return dg


def remap(dg: tp.DependencyGraph) -> None:
    """(Re)build the split and concat mappings of :func:`trace`; after each ``group.prune()``
    torch-pruning updates the chunk and concat sizes, so call this before the next group."""
    dg.nni_elastic_unmapped_splits = _map_splits(dg)
    _map_concats(dg)


def _map_concats(dg: tp.DependencyGraph) -> None:
    """Map every channel concatenation by its inputs' argument positions.

    torch-pruning skips a concatenation whose consumer sees a different channel count (e.g. a
    ghost module's ``torch.cat([x1, x2], 1)[:, :out]``), and then maps every input to offset 0.
    The argument position of each input is the index of its edge among the concat's autograd
    inputs; the sizes are torch-pruning's own per-input inference.
    """
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    for node in list(dg.module2node.values()):
        if node.type != ops.OPTYPE.CONCAT or getattr(node.grad_fn, "_saved_dim", None) != 1:
            continue
        sizes = node.module.concat_sizes
        edges = [f for f, _ in node.grad_fn.next_functions]
        positions = [[i for i, f in enumerate(edges) if f is inp.grad_fn] for inp in node.inputs]
        if not sizes or None in sizes or len(sizes) != len(node.inputs) or any(len(p) != 1 for p in positions):
            continue  # an input used twice, or sizes torch-pruning could not infer: leave its mapping
        order = sorted(range(len(node.inputs)), key=lambda j: positions[j][0])
        offsets, start = {}, 0
        for j in order:
            offsets[j] = [start, start + sizes[j]]
            start += sizes[j]
        for j, inp in enumerate(node.inputs):
            for dep in node.dependencies:
                if dep.target is inp:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[j], reverse=True)
            for dep in inp.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[j], reverse=False)
        node.module.offsets = [0] + [offsets[j][1] for j in order]
        node.enable_index_mapping = False  # torch-pruning re-maps before every group: keep these


def _map_splits(dg: tp.DependencyGraph) -> set[object]:
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping

    unmapped: set[object] = set()
    for node in list(dg.module2node.values()):
        if node.type != ops.OPTYPE.SPLIT:
            continue
        fn = node.grad_fn
        if getattr(node.module, "nni_elastic_channel_split", False):
            sizes = list(node.module.split_sizes)  # kept up to date by torch-pruning's SplitPruner
        else:
            shape = getattr(fn, "_saved_self_sym_sizes", None)
            dim = getattr(fn, "_saved_dim", None)
            if shape is None or dim is None or not 0 <= int(dim) < 64:
                unmapped.add(node.module)
                continue
            if int(dim) % len(shape) != 1:
                continue  # not a channel split: nothing to map
            total = int(shape[1])
            if hasattr(fn, "_saved_split_sizes"):
                sizes = [int(v) for v in fn._saved_split_sizes]
            else:
                step = int(fn._saved_split_size)
                sizes = [min(step, total - o) for o in range(0, total, step)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        # offsets=None makes torch-pruning's own (order-based) update skip this split: it runs again
        # before every get_pruning_group and would overwrite the mappings set here
        node.module.offsets, node.module.split_sizes = None, sizes
        node.module.nni_elastic_channel_split = True
        for out in node.outputs:
            edges = out.grad_fn.next_functions if out.grad_fn is not None else ()
            chunks = {nr for f, nr in edges if f is fn}
            if len(chunks) != 1:
                unmapped.add(node.module)
                continue
            nr = chunks.pop()
            for dep in node.dependencies:
                if dep.target is out:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr:nr + 2], reverse=False)
            for dep in out.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr:nr + 2], reverse=True)
    return unmapped


_TP_STAGES = {
    "reshape": "a view/reshape over channels (e.g. a channel shuffle)",
    "concat": "a channel concatenation",
    "split": "a channel split",
    "slice": "a channel slice",
    "unbind": "an unbind",
    "expand": "an expand",
    "flatten": "a flatten before a Linear layer",
}


def _failed_op(exc: BaseException) -> str:
    """Where inside torch-pruning a trace failed, as an op a user can find in their forward."""
    tb, where = exc.__traceback__, None
    while tb is not None:
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            where = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    if where is None:
        return ""
    op = next((text for key, text in _TP_STAGES.items() if key in where), None)
    return f" (torch-pruning failed in {where}" + (f", while mapping {op})" if op else ")")


def build_channel_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignored_layers: Iterable[Union[str, nn.Module]] = (),
    unsupported: str = "error",
) -> ChannelGraph:
    """Trace ``model`` with torch-pruning and return its elastic channel groups.

    Groups coupled to the model output (the classifier) and groups whose producer lies under an
    ``ignored_layers`` path keep their full width and are listed in ``ChannelGraph.fixed``.

    Args:
        model: any CNN torch-pruning can trace.
        example_inputs: a batch (or tuple of inputs) used for tracing.
        ignored_layers: module paths (or modules) whose output channels never shrink.
        unsupported: ``"error"`` raises on a group that cannot be sliced; ``"keep"`` keeps such
            groups at full width and records why in ``ChannelGraph.problems``.

    Raises:
        UnsupportedModuleError: a module in an elastic group cannot be sliced; the message names
            its path and type and the ``ignored_layers`` entry that avoids it.
    """
    if unsupported not in UNSUPPORTED_MODES:
        raise ValueError(f"unsupported={unsupported!r} is not supported; use one of {UNSUPPORTED_MODES}")
    ignored = _resolve_ignored(model, ignored_layers)
    names = _module_names(model)
    was_training = model.training
    try:
        dg = trace(model, example_inputs)
    except Exception as exc:  # tracing runs user code; name what failed
        raise ValueError(
            f"torch-pruning could not trace {type(model).__name__} with example inputs of shape "
            f"{_shape_of(example_inputs)}{_failed_op(exc)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        model.train(was_training)

    groups: list[ChannelGroup] = []
    fixed: list[str] = []
    dims: dict[tuple[str, str], int] = {}
    axes: dict[tuple[str, str], int] = {}
    seen_out: set[str] = set()
    problems: dict[str, str] = {}
    for module in list(dg.module2node):
        if not isinstance(module, _ROOTS) or names.get(module) in seen_out:
            continue
        root = names[module]
        pruner = dg.get_pruner_of_module(module)
        size = pruner.get_out_channels(module)
        tp_group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        members, coupled_to_output, touches_ignored, problem = [], False, False, None
        chunks: list[list[tuple[int, int]]] = []  # per channel split: (root channel, chunk index)
        op_names: set[str] = set()
        for item in tp_group:
            dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
            target = dep.target
            tname = names.get(target.module, str(target.module))
            dim = _member_dim(dg, target.module, dep.handler) if isinstance(target.module, nn.Module) else "out"
            terminal = not target.outputs  # nothing consumes it: it is (part of) the model output
            if target.type == ops.OPTYPE.OUTPUT or (terminal and (dim == "out" or target.type in _PASS_THROUGH)):
                coupled_to_output = True
            if target.type in _PASS_THROUGH or target.type == ops.OPTYPE.OUTPUT:
                op_names.add(target.type.name.lower())
                continue
            if dim == "out":
                seen_out.add(tname)
                touches_ignored |= _under(tname, ignored)
            if target.type == ops.OPTYPE.SPLIT and not getattr(target.module, "nni_elastic_channel_split", False):
                if target.module not in dg.nni_elastic_unmapped_splits:
                    continue  # a split along another dimension carries the channels through
            if target.type == ops.OPTYPE.SPLIT and target.module not in dg.nni_elastic_unmapped_splits:
                sizes = list(target.module.split_sizes)
                if len(set(sizes)) > 1:
                    problem = problem or (
                        f"a channel split into unequal chunks {sizes} ({target.grad_fn.name()}) splits channel group "
                        f"{root!r}: the model's forward holds those sizes, so only equal chunks (x.chunk(n, 1)) can "
                        "shrink, each keeping the same share"
                    )
                else:
                    chunks.append([(r, i // sizes[0]) for i, r in zip(idxs, root_idxs)])
                continue
            if target.type in _CHANNEL_OPS:
                problem = problem or (
                    f"a channel {_CHANNEL_OPS[target.type]} op ({target.grad_fn.name() if target.grad_fn else tname}) "
                    f"splits channel group {root!r}: torch-pruning cannot map channels through it and the model's "
                    "forward holds the original sizes"
                )
                continue
            if isinstance(target.module, nn.PReLU) and target.module.num_parameters == 1:
                continue  # one shared slope: nothing to slice
            axis = None
            if isinstance(target.module, nn.Parameter):
                owner, _, pname = tname.rpartition(".")
                axis = int(dg.module2node[target.module].pruning_dim) % target.module.dim()
                tname, dim = owner, f"param:{pname}"
            else:
                problem = problem or _module_problem(tname, target.module)
            positions: list[list[int]] = [[] for _ in range(size)]
            if any(not 0 <= r < size for r in root_idxs):
                problem = problem or (
                    f"torch-pruning maps the channels of group {root!r} inconsistently at {tname!r} (its trace "
                    f"holds {', '.join(sorted(op_names)) or 'no'} ops between them, e.g. a channel shuffle)"
                )
                continue
            for i, r in zip(idxs, root_idxs):
                positions[r].append(i)
            members.append(Member(tname, dim, tuple(tuple(p) for p in positions), axis))
        if coupled_to_output or touches_ignored:
            fixed.append(root)
            continue
        group = ChannelGroup(root, size, members, tp_group, ops=tuple(sorted(op_names)))
        if problem is None:
            problem = _block_order(group, model, chunks)
        if problem is not None:
            problems[root] = problem
            fixed.append(root)
            continue
        groups.append(group)
        for m in members:
            dims[(m.module, m.dim)] = _full_size(model, m)
            if m.axis is not None:
                axes[(m.module, m.dim)] = m.axis
    if problems and unsupported == "error":
        raise unsupported_error(problems)
    if problems:
        _warn_kept(problems)
    return ChannelGraph(groups, dims, fixed, problems, axes)


def _block_order(group: ChannelGroup, model: nn.Module, chunks: Sequence[Sequence[tuple[int, int]]] = ()) -> Optional[str]:
    """Set ``group.order``/``step``/``cells`` so every level keeps equal channels per block.

    Grouped convolutions and GroupNorm split a dimension into equal blocks; torch-pruning keeps
    their group count and prunes the same number of channels in each block, so levels must too.
    An equal channel split (``x.chunk(n, 1)``) is the same: each chunk keeps a prefix of its own,
    all of one length, so the model's forward still cuts the sliced tensor at the right places.
    Returns a problem if the blocks of several members cut the group into unequal cells.
    """
    labels: list[tuple[int, ...]] = [() for _ in range(group.size)]
    blocked = bool(chunks)
    for split in chunks:
        chunk_of = dict(split)
        for r in range(group.size):
            labels[r] = labels[r] + (chunk_of.get(r, -1),)
    for m in group.members:
        if m.axis is not None:
            continue
        blocks = _slicing.channel_blocks(model.get_submodule(m.module), m.dim)
        if blocks <= 1:
            continue
        blocked = True
        width = _full_size(model, m) // blocks
        for r in range(group.size):
            labels[r] = labels[r] + ((m.positions[r][0] // width) if m.positions[r] else -1,)
    if not blocked:
        return None
    cells: dict[tuple[int, ...], list[int]] = {}
    for r, label in enumerate(labels):
        cells.setdefault(label, []).append(r)
    sizes = {len(c) for c in cells.values()}
    if len(sizes) != 1:
        blocked_members = [m.module for m in group.members if m.axis is None]
        return (
            f"grouped layers cut channel group {group.name!r} into unequal blocks ({sorted(len(c) for c in cells.values())} "
            f"channels; members {blocked_members[:6]}), so no level can keep the same number in each"
        )
    group.cells = list(cells.values())
    group.step = len(group.cells)
    group.order = [cell[t] for t in range(sizes.pop()) for cell in group.cells]
    return None


def unsupported_error(problems: Mapping[str, str]) -> UnsupportedModuleError:
    """One error for every group that cannot be sliced, with both fixes."""
    roots = list(problems)
    first = problems[roots[0]]
    more = f" (and {len(roots) - 1} more group(s): {roots[1:6]})" if len(roots) > 1 else ""
    return UnsupportedModuleError(
        f"channel group {roots[0]!r}: {first}{more}; keep these groups at full width with "
        f"ElasticModel(..., unsupported='keep') or ElasticModel(..., ignored_layers={roots!r})"
    )


def _warn_kept(problems: Mapping[str, str]) -> None:
    lines = "; ".join(f"{root!r}: {why}" for root, why in problems.items())
    message = f"nni-elastic keeps {len(problems)} channel group(s) at full width because they cannot be sliced: {lines}"
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=4)


def _shape_of(inputs: object) -> object:
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape)
    if isinstance(inputs, (list, tuple)):
        return [_shape_of(x) for x in inputs]
    return type(inputs).__name__


def _full_size(model: nn.Module, m: Member) -> int:
    module = model.get_submodule(m.module)
    if m.axis is not None:
        return getattr(module, m.dim.split(":", 1)[1]).shape[m.axis]
    return _slicing.channel_count(module, m.dim)


# --------------------------------------------------------------------------- importance

ImportanceFn = Callable[[object], torch.Tensor]
IMPORTANCES: Registry[Callable[[], ImportanceFn]] = Registry("importance")
IMPORTANCES.register("l1")(lambda: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2")(lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("bn")(lambda: tp.importance.BNScaleImportance())
IMPORTANCES.register("fpgm")(lambda: tp.importance.FPGMImportance())
IMPORTANCES.register("lamp")(lambda: tp.importance.LAMPImportance())
IMPORTANCES.register("taylor")(lambda: tp.importance.GroupTaylorImportance())
# Optimal Brain Damage (LeCun et al. 1989) as torch-pruning scores it: w^2 times the diagonal of the
# Fisher approximation of the Hessian, which it reads from ``.grad`` (see ``GRADIENT_IMPORTANCES``)
IMPORTANCES.register("hessian")(lambda: tp.importance.GroupHessianImportance())
IMPORTANCES.register("random")(lambda: tp.importance.RandomImportance())

#: criteria that read ``.grad`` and need backward passes on data first, with what ``.grad`` must
#: hold: ``"batch"`` the summed gradients of the batch losses (Taylor), ``"sample"`` the mean of the
#: squared per-sample gradients (the Fisher diagonal torch-pruning's Hessian importance expects; its
#: own ``accumulate_grad`` keeps only the last sample in torch-pruning 1.6)
GRADIENT_IMPORTANCES = {"taylor": "batch", "hessian": "sample"}


def accumulate_gradients(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    importance: str = "taylor",
    max_batches: int = 8,
    max_samples: int = 64,
) -> None:
    """Fill the ``.grad`` of ``model``'s parameters as the gradient importance ``importance`` reads it.

    ``"taylor"``: the summed gradients of up to ``max_batches`` batch losses. ``"hessian"``: the
    mean of the squared gradients of up to ``max_samples`` per-sample losses (the empirical Fisher
    diagonal; torch-pruning's documented usage: one forward per batch, one backward per sample).
    The model's buffers (BatchNorm running statistics) are put back afterwards, so ranking does
    not change the function.

    Args:
        model: the network (its current train/eval mode is used).
        data: batches ``(x, y)``.
        loss_fn: ``loss_fn(output, target)``, a mean over the batch.
        importance: a key of :data:`GRADIENT_IMPORTANCES`.
    """
    if importance not in GRADIENT_IMPORTANCES:
        raise ValueError(f"importance {importance!r} reads no gradients; gradient importances: {sorted(GRADIENT_IMPORTANCES)}")
    per_sample = GRADIENT_IMPORTANCES[importance] == "sample"
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    squares: dict[nn.Parameter, torch.Tensor] = {}
    seen = 0
    model.zero_grad(set_to_none=True)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for i, (x, y) in enumerate(data):
                if i >= max_batches or (per_sample and seen >= max_samples):
                    break
                x, y = x.to(device), y.to(device)
                if not per_sample:
                    loss_fn(model(x), y).backward()
                    continue
                n = min(len(x), max_samples - seen)
                out = model(x[:n])
                for j in range(n):
                    model.zero_grad(set_to_none=True)
                    loss_fn(out[j:j + 1], y[j:j + 1]).backward(retain_graph=j < n - 1)
                    for p in params:
                        if p.grad is not None:
                            sq = p.grad.detach().pow(2)
                            squares[p] = squares[p] + sq if p in squares else sq
                seen += n
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if per_sample:
        model.zero_grad(set_to_none=True)
        for p, sq in squares.items():
            p.grad = sq / max(seen, 1)


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
    failures: Optional[dict[str, str]] = None,
) -> dict[str, torch.Tensor]:
    """Score every channel of every elastic group; returns ``{group: scores}`` (length ``size``).

    Gradient-based criteria (``"taylor"``, ``"hessian"``) read ``.grad``: fill it first as
    :data:`GRADIENT_IMPORTANCES` says (:func:`accumulate_gradients`). A built-in
    criterion that fails on a group (torch-pruning's index mapping out of range) raises
    :class:`UnsupportedModuleError` naming it, or, with a ``failures`` dict, is recorded there and
    the group gets no score.
    """
    scorer = create_importance(importance)
    fallback = None
    scores: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        try:
            with torch.no_grad():
                s = scorer(g.tp_group)
        except (IndexError, RuntimeError) as exc:
            if callable(importance):
                raise
            reason = (
                f"torch-pruning's {importance!r} importance fails on channel group {g.name!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}): its channel mapping is inconsistent (ops in its trace: "
                f"{', '.join(g.ops) or 'none'}, e.g. a channel shuffle)"
            )
            if failures is None:
                raise UnsupportedModuleError(reason) from exc
            failures[g.name] = reason
            continue
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


def _permute_member(module: nn.Module, m: Member, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Move channel ``src[i]`` of every tensor the member indexes to position ``dst[i]``."""
    if m.axis is not None:
        entries = [(getattr(module, m.dim.split(":", 1)[1]), m.axis)]
    else:
        entries = [(getattr(module, name), axis) for name, axis in _slicing.channel_tensors(module, m.dim)]
        if _slicing.has_level_rows(module):
            entries += [(module.level_running_mean, 1), (module.level_running_var, 1)]
        elif getattr(module, "running_mean", None) is not None and not entries:
            entries += [(module.running_mean, 0), (module.running_var, 0)]
    grouped_in = m.dim == "in" and _slicing.channel_blocks(module, "in") > 1
    with torch.no_grad():
        for tensor, axis in entries:
            if grouped_in:
                _permute_grouped_in(module, tensor, axis, src, dst)
                continue
            moved = tensor.index_select(axis, src.to(tensor.device))
            tensor.index_copy_(axis, dst.to(tensor.device), moved)


def _permute_grouped_in(module: nn.Module, weight: torch.Tensor, axis: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Input channels of a grouped convolution: each block of outputs has its own weight columns."""
    groups = module.groups
    width_in = module.in_channels // groups
    rows = weight.shape[0] // groups  # transposed grouped convolutions are refused earlier
    for s, d in zip(src.tolist(), dst.tolist()):
        if s // width_in != d // width_in:
            raise UnsupportedModuleError(f"a reorder moves input channels of {type(module).__name__} across its groups")
    view = weight.detach().clone()
    for s, d in zip(src.tolist(), dst.tolist()):
        rows_sel = slice((s // width_in) * rows, (s // width_in + 1) * rows)
        weight.data[rows_sel, d % width_in] = view[rows_sel, s % width_in]


def reorder_channels(
    model: nn.Module,
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    prefix: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Permute every member of every group so that channels come in descending score order.

    Function-preserving: the model computes the same outputs afterwards (up to float rounding).
    Channels move only inside their block (see :class:`ChannelGroup`), so grouped convolutions
    and GroupNorm keep their structure.

    Args:
        model: the traced model (modified in place).
        graph: its channel graph.
        scores: ``{group: per-channel score}`` from :func:`rank_channels`.
        prefix: optional ``{group: k}``; only the channels a level of ``k`` channels keeps are
            reordered (used to re-rank inside a nested level without disturbing the channels
            outside it).

    Returns:
        ``{group: perm}`` where new channel ``i`` is old channel ``perm[i]``.
    """
    perms: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.name not in scores:
            continue
        k = g.size if prefix is None else int(prefix.get(g.name, g.size))
        kept = set(g.order[:k])
        s = scores[g.name]
        perm = torch.arange(g.size)
        for cell in g.cells:
            head = [r for r in cell if r in kept]
            if head:
                ranked = sorted(head, key=lambda r: (-float(s[r]), r))
                perm[torch.tensor(head, dtype=torch.long)] = torch.tensor(ranked, dtype=torch.long)
        perms[g.name] = perm
    apply_permutations(model, graph, perms)
    return perms


def apply_permutations(model: nn.Module, graph: ChannelGraph, perms: Mapping[str, torch.Tensor]) -> None:
    """Permute the channels of groups: new channel ``i`` of group ``g`` is old channel ``perms[g][i]``."""
    for g in graph.groups:
        perm = perms.get(g.name)
        if perm is None or torch.equal(perm, torch.arange(g.size)):
            continue
        for m in g.members:
            module = model.get_submodule(m.module)
            src = torch.tensor([i for r in perm.tolist() for i in m.positions[r]], dtype=torch.long)
            dst = torch.tensor([i for r in range(g.size) for i in m.positions[r]], dtype=torch.long)
            _permute_member(module, m, src, dst)


def kept_roots(group: ChannelGroup, k: int) -> list[int]:
    """The root channels a level keeping ``k`` channels of ``group`` keeps."""
    return group.order[:k]


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
            for r in g.order[k:]:
                bucket.update(m.positions[r])
    out: dict[tuple[str, str], Union[int, torch.Tensor]] = {}
    for key, full in graph.dims.items():
        gone = dropped.get(key, set())
        keep = [i for i in range(full) if i not in gone]
        out[key] = len(keep) if keep == list(range(len(keep))) else torch.tensor(keep, dtype=torch.long)
    return out
