"""Receptive-field geometry of a convolutional trunk, from its traced graph.

The trunk is traced with :mod:`torch.fx`; every node gets, per spatial axis, an affine box map
``output position j  <-  input pixels [j*S + a, j*S + b]`` (``S`` = cumulative stride, ``b - a + 1``
= receptive field). Convolutions and pools compose the map; element-wise layers (BatchNorm in eval
mode, activations, residual additions, channel concatenation) merge the maps of their inputs. Any
layer that mixes positions globally (adaptive/global pooling, Linear, flatten, GroupNorm, ...) or
whose behaviour changes between calls (BatchNorm/Dropout in train mode) is refused, naming it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gigaslide.errors import GigaslideError

#: Modules applied position by position (their output at (y, x) depends only on the input at (y, x)).
_POINTWISE_MODULES: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
    torch.add, torch.mul, torch.sub, torch.relu, torch.sigmoid, torch.tanh,
    nn.functional.relu, nn.functional.relu6, nn.functional.gelu, nn.functional.silu, nn.functional.leaky_relu,
    nn.functional.hardswish, nn.functional.sigmoid,
}
_POINTWISE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "sigmoid", "tanh", "contiguous", "float",
                      "half", "bfloat16", "to", "clone"}


@dataclass(frozen=True)
class Axis:
    """Box map along one axis: output j depends on input [j*stride + lo, j*stride + hi]."""

    stride: int
    lo: int
    hi: int

    @property
    def field(self) -> int:
        """Receptive field in input pixels."""
        return self.hi - self.lo + 1


@dataclass(frozen=True)
class _Op:
    """One traced node: a window op (conv/pool) on one input, or a merge of several inputs."""

    name: str
    inputs: tuple[int, ...]
    window: tuple[tuple[int, int, int, int], ...] | None = None  # per axis (kernel, stride, pad, dilation)
    ceil_mode: bool = False


class Geometry:
    """Receptive-field geometry of a trunk; maps input sizes to output sizes and tiles to input boxes."""

    def __init__(self, ops: list[_Op], output: int):
        self.ops = ops
        self.output = output
        self.axes = tuple(self._axis(d) for d in range(2))

    @classmethod
    def of(cls, trunk: nn.Module) -> Geometry:
        return trace(trunk)

    def _axis(self, d: int) -> Axis:
        maps: list[Axis | None] = []
        for op in self.ops:
            if not op.inputs:
                maps.append(Axis(1, 0, 0))
                continue
            ins = [maps[i] for i in op.inputs if maps[i] is not None]
            if op.window is not None:
                (m,) = ins
                k, s, p, dil = op.window[d]
                maps.append(Axis(m.stride * s, m.lo - p * m.stride, m.hi + (dil * (k - 1) - p) * m.stride))
                continue
            strides = {m.stride for m in ins}
            if len(strides) != 1:
                raise GigaslideError(f"layer '{op.name}' merges feature maps of different strides {sorted(strides)}",
                                     fix="use a trunk whose branches are aligned (a standard ResNet)")
            maps.append(Axis(ins[0].stride, min(m.lo for m in ins), max(m.hi for m in ins)))
        out = maps[self.output]
        assert out is not None
        return out

    @property
    def stride(self) -> tuple[int, int]:
        return self.axes[0].stride, self.axes[1].stride

    @property
    def field(self) -> tuple[int, int]:
        return self.axes[0].field, self.axes[1].field

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Output (h, w) of the trunk for an input of ``size`` (h, w); 0 where it would be empty."""
        return self._length(size[0], 0), self._length(size[1], 1)

    def _length(self, n: int, d: int) -> int:
        lens: list[int] = []
        for op in self.ops:
            if not op.inputs:
                lens.append(n)
                continue
            ins = [lens[i] for i in op.inputs]
            if op.window is None:
                lens.append(min(ins))
                continue
            k, s, p, dil = op.window[d]
            span = ins[0] + 2 * p - dil * (k - 1) - 1
            if span < 0:
                lens.append(0)
                continue
            if op.ceil_mode:
                out = -(-span // s) + 1
                if (out - 1) * s >= ins[0] + p:
                    out -= 1
            else:
                out = span // s + 1
            lens.append(max(out, 0))
        return lens[self.output]

    def min_tile(self, align: int = 1) -> int:
        """Smallest input tile (px) that yields at least ``align`` (one pooling window of) exact output
        positions per tile, wherever the tile starts."""
        need = max(ax.field + align * ax.stride for ax in self.axes)
        s = max(self.stride)
        return int(math.ceil(need / s) * s)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))


def _window(mod: nn.Module, name: str) -> tuple[tuple[int, int, int, int], ...]:
    k = _pair(mod.kernel_size)
    s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = 0
        else:
            raise GigaslideError(f"layer '{name}' ({type(mod).__name__}) uses padding='{pad}'",
                                 fix="use explicit integer padding (symmetric) in the trunk")
    p = _pair(pad)
    if getattr(mod, "padding_mode", "zeros") == "circular" and any(p):
        # wraps the opposite image edge in: a crop cannot see it (reflect / replicate stay local: streamed exactly)
        raise GigaslideError(f"layer '{name}' ({type(mod).__name__}) uses padding_mode='circular'",
                             fix="use padding_mode='zeros' (or 'reflect' / 'replicate') in the trunk")
    dil = _pair(getattr(mod, "dilation", 1))
    if isinstance(mod, nn.AvgPool2d) and getattr(mod, "divisor_override", None):
        raise GigaslideError(f"layer '{name}' uses divisor_override", fix="use a plain AvgPool2d")
    return tuple((k[i], s[i], p[i], dil[i]) for i in range(2))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _frozen_bn_type() is not None and isinstance(m, _frozen_bn_type()):
            return True
        return super().is_leaf_module(m, qualname)


def _frozen_bn_type() -> type | None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except Exception:  # noqa: BLE001
        return None
    return FrozenBatchNorm2d


def check_modes(trunk: nn.Module) -> None:
    """Refuse layers whose output would differ between the streamed re-computations."""
    for name, mod in trunk.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            raise GigaslideError(
                f"trunk layer '{name}' ({type(mod).__name__}) is in train mode: its batch statistics depend on the tile",
                fix="call trunk.eval() (BatchNorm must use frozen running statistics for streaming)")
        active_drop = (isinstance(mod, _DROPOUT) and mod.p > 0) or float(getattr(mod, "drop_prob", 0) or 0) > 0
        if active_drop and mod.training:  # nn.Dropout*, timm DropPath / DropBlock: a new random mask per call
            raise GigaslideError(f"trunk layer '{name}' ({type(mod).__name__}) is active dropout: re-computation would differ",
                                 fix="call trunk.eval() or remove dropout from the trunk")


def trace(trunk: nn.Module) -> Geometry:
    """Trace ``trunk`` and build its :class:`Geometry`; refuses layers that cannot be streamed."""
    check_modes(trunk)
    try:
        graph = _Tracer().trace(trunk)
    except Exception as e:  # noqa: BLE001
        raise GigaslideError(f"cannot trace the trunk ({type(trunk).__name__}) to find its layer geometry: {e}",
                             fix="pass a plain conv/pool/BN/activation network (e.g. a ResNet without its head)") from None
    modules = dict(trunk.named_modules())
    index: dict[fx.Node, int] = {}
    ops: list[_Op] = []
    out = -1
    for node in graph.nodes:
        if node.op == "get_attr":
            continue  # constant tensors (no spatial extent)
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node) or arg not in index:
                raise GigaslideError("the trunk must return one feature map tensor",
                                     fix="wrap it so forward(x) returns the [B, C, h, w] feature map")
            out = index[arg]
            continue
        spatial = tuple(index[a] for a in node.all_input_nodes if a in index)
        if node.op == "placeholder":
            if ops:
                raise GigaslideError("the trunk takes more than one input", fix="use a trunk with forward(x)")
            index[node] = len(ops)
            ops.append(_Op(node.name, ()))
            continue
        if not spatial:
            continue  # arithmetic on constants only
        op = _node_op(node, spatial, modules)
        index[node] = len(ops)
        ops.append(op)
    if out < 0 or not ops:
        raise GigaslideError("the trunk has no output", fix="pass a network whose forward returns a feature map")
    return Geometry(ops, out)


def _refuse(name: str, what: str) -> GigaslideError:
    return GigaslideError(
        f"trunk layer '{name}' ({what}) cannot be streamed: it mixes all positions or changes the geometry",
        fix="remove global pooling / Linear / flatten / normalisation over space from the trunk; "
            "put them in the head (e.g. timm.create_model(name, num_classes=0, global_pool=''))")


#: Window operations called as functions: their geometry is read from modules only.
_WINDOW_FUNCTIONS = {
    F.conv2d: "an nn.Conv2d module", torch.conv2d: "an nn.Conv2d module", F.max_pool2d: "an nn.MaxPool2d module",
    torch.max_pool2d: "an nn.MaxPool2d module", F.avg_pool2d: "an nn.AvgPool2d module",
    F.pad: "the padding= of the next nn.Conv2d module",
}


def _node_op(node: fx.Node, spatial: tuple[int, ...], modules: dict[str, nn.Module]) -> _Op:
    if node.op == "call_module":
        mod = modules[str(node.target)]
        name = str(node.target)
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            if len(spatial) != 1:
                raise _refuse(name, type(mod).__name__)
            if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
                raise _refuse(name, "MaxPool2d with return_indices")
            return _Op(name, spatial, _window(mod, name), bool(getattr(mod, "ceil_mode", False)))
        fbn = _frozen_bn_type()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or (fbn is not None and isinstance(mod, fbn)):
            return _Op(name, spatial)
        if isinstance(mod, _POINTWISE_MODULES + _DROPOUT):
            return _Op(name, spatial)
        raise _refuse(name, type(mod).__name__)
    if node.op == "call_function":
        fn = node.target
        if fn in _POINTWISE_FUNCTIONS:
            return _Op(node.name, spatial)
        if fn is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim in (1, -3):
                return _Op(node.name, spatial)
        if fn in _WINDOW_FUNCTIONS:
            raise GigaslideError(f"trunk layer '{node.name}' calls {getattr(fn, '__name__', fn)}() as a function: "
                                 "its window geometry cannot be read",
                                 fix=f"use {_WINDOW_FUNCTIONS[fn]} in the trunk instead")
        raise _refuse(node.name, getattr(fn, "__name__", str(fn)))
    if node.op == "call_method":
        if node.target in _POINTWISE_METHODS:
            return _Op(node.name, spatial)
        raise _refuse(node.name, f"tensor.{node.target}()")
    raise _refuse(node.name, node.op)
