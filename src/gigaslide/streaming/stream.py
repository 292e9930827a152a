"""StreamingCNN: run a convolutional trunk tile by tile with exact outputs and exact gradients.

Forward: every crop of the tile plan runs under ``no_grad`` and its exact part is stitched into the
feature map, so memory is bounded by one tile (plus the input and the feature map). Backward: given
the gradient of the whole feature map, each crop is re-run with autograd on and the gradient of its
exact part is back-propagated; parameter (and input) gradients are summed over crops. Both equal
the whole-image pass up to floating-point summation order.

Images that fit in a single tile are run as one (dense) pass -- that is exact by definition; pass
``small_image="error"`` to refuse them instead.

Pooling (``pool_kernel = k > 1``, StreamingCLAM's max-pool before the attention head): the tile plan
aligns every crop's exact outputs to multiples of ``k`` and each crop's output is max-pooled as it is
produced, so the full-resolution feature map is never held whole (forward or backward); the result
equals ``max_pool2d(trunk(image), k, k, ceil_mode=True)``. Padding rule: when ``k`` does not divide the
feature map, the last row / column of windows pools only the positions that exist (``ceil_mode``:
the map is padded with -inf, never with zeros or glass features).

The image may be a tensor or any *crop source* (an object with ``shape`` ``[B, C, H, W]`` and
``crop(rows, cols) -> tensor``), e.g. :class:`gigaslide.streaming.data.AugmentedImage`, which flips and
rotates each crop instead of the whole image so the image is held once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.memory import set_malloc_thresholds
from gigaslide.streaming.geometry import Geometry, check_modes, trace
from gigaslide.streaming.tiles import Tile, plan


_OWN: Any = object()  # "the stream's own transform" (a transform may be None)


class StreamingCNN(nn.Module):
    """``StreamingCNN(trunk, tile_size)(image)`` equals ``trunk(image)``, computed tile by tile.

    Args:
        trunk: conv/pool/BatchNorm(eval)/activation network returning a feature map, e.g. a ResNet
            without its global pooling and classifier.
        tile_size: input crop size in px (at least :attr:`min_tile_size`).
        transform: optional callable applied to every crop before the trunk (e.g. uint8 -> normalised
            float), so the whole image can stay compact in memory. Must act pixel by pixel.
        channels_last: run crops in channels-last memory format (faster CNNs on CPU and CUDA).
        small_image: ``"dense"`` runs an image no larger than one tile in one pass; ``"error"`` refuses it.
        pool_kernel: max-pool kernel (= stride) applied to the trunk's output, streamed (1 = no pooling).
        checkpoint_blocks: recompute activations in backward: per residual block, and the stem (conv, BN,
            activation, pool before the first stage) as one segment. Lower memory, same gradients.
        trim_memory: on Linux (glibc), have allocations of 1 MB and more served by ``mmap`` and freed
            memory trimmed, so buffers freed between tiles go back to the OS instead of being cached by
            ``malloc`` (measured here: peak RSS -1.1 GB at 4096², for ~+10 % time). Process-wide.

    The image may be uint8 (with a ``transform``) and may live on the CPU while the trunk is on a GPU:
    crops are moved to the trunk's device; the feature map is returned there.
    """

    def __init__(self, trunk: nn.Module, tile_size: int, *, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 channels_last: bool = False, small_image: str = "dense", checkpoint_blocks: bool = False,
                 trim_memory: bool = False, pool_kernel: int = 1):
        super().__init__()
        if small_image not in ("dense", "error"):
            raise GigaslideError(f"small_image={small_image!r}", fix="use 'dense' or 'error'")
        if isinstance(pool_kernel, bool) or not isinstance(pool_kernel, int) or pool_kernel < 1:
            raise GigaslideError(f"pool kernel {pool_kernel!r} is not a positive integer",
                                 fix="use --pool-kernel 8 (as StreamingCLAM) or 1 (no pooling)")
        self.pool_kernel = int(pool_kernel)
        self.trunk = trunk
        self.geometry: Geometry = trace(trunk)
        self.tile_size = int(tile_size)
        self.transform = transform
        self.channels_last = channels_last
        self.small_image = small_image
        self.checkpoint_blocks = checkpoint_blocks
        if trim_memory:
            trim_freed_memory()
        object.__setattr__(self, "_runner", None)  # what runs a crop: the trunk, or a graph with a checkpointed stem
        if checkpoint_blocks:
            # a plain attribute, not a registered sub-module: the graph shares the trunk's modules, and
            # state_dict / parameters() must list them once, under the trunk's names
            object.__setattr__(self, "_runner", _checkpoint_stem(trunk))  # after tracing: fx sees the original forwards
            _checkpoint_blocks(trunk)
        if self.tile_size < self.min_tile_size:
            raise GigaslideError(
                f"tile size {self.tile_size} px is smaller than this trunk's minimum {self.min_tile_size} px "
                f"(receptive field {max(self.geometry.field)} px, stride {max(self.geometry.stride)}"
                f"{f', pool kernel {self.pool_kernel}' if self.pool_kernel > 1 else ''})",
                fix=f"use --tile-size {self.min_tile_size} or larger (several times the receptive field is efficient)")

    @property
    def min_tile_size(self) -> int:
        return self.geometry.min_tile(self.pool_kernel)

    @property
    def stride(self) -> int:
        """The trunk's stride (canvas px per trunk output position)."""
        return max(self.geometry.stride)

    @property
    def out_stride(self) -> int:
        """Canvas px per position of the returned (pooled) map: ``stride * pool_kernel``."""
        return self.stride * self.pool_kernel

    def train(self, mode: bool = True) -> StreamingCNN:
        """Train mode for wrappers; the trunk itself stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.trunk.eval()
        return self

    def trunk_output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The trunk's (unpooled) output (h, w) for an input of ``size``."""
        return self.geometry.output_size(size)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The returned map's (h, w): the trunk's output, max-pooled with ``ceil_mode`` when ``pool_kernel > 1``."""
        h, w = self.geometry.output_size(size)
        k = self.pool_kernel
        return -(-h // k), -(-w // k)

    def tiles(self, size: tuple[int, int]) -> list[Tile]:
        """The tile plan for an input of ``size`` (h, w)."""
        out = self.trunk_output_size(size)
        if out[0] <= 0 or out[1] <= 0:
            raise GigaslideError(f"image {size[0]}x{size[1]} px is too small for this trunk (empty feature map)",
                                 fix=f"use images of at least {max(self.geometry.stride)} px per side")
        if size[0] <= self.tile_size and size[1] <= self.tile_size and self.small_image == "error":
            raise GigaslideError(f"image {size[0]}x{size[1]} px fits in one tile of {self.tile_size} px: nothing to stream",
                                 fix="use a smaller --tile-size, a larger image, or small_image='dense'")
        return plan(size, self.tile_size, self.geometry.axes, out, self.pool_kernel)

    def run_crop(self, crop: torch.Tensor, transform: Any = _OWN) -> torch.Tensor:
        """Run the trunk on one crop (moved to the trunk's device: the image may stay in CPU memory);
        ``transform``: the crop transform to apply (default: :attr:`transform`)."""
        dev = next((p.device for p in self.trunk.parameters()), crop.device)
        x = crop.to(dev, non_blocking=True) if crop.device != dev else crop
        tf = self.transform if transform is _OWN else transform
        x = tf(x) if tf is not None else x
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self._runner or self.trunk)(x)

    def exact_output(self, crop: torch.Tensor, t: Tile, transform: Any = _OWN) -> torch.Tensor:
        """Run one crop of the plan and keep its exact outputs, pooled when ``pool_kernel > 1``."""
        y = self.run_crop(crop, transform)[..., t.rows.local(self.geometry.stride[0]),
                                           t.cols.local(self.geometry.stride[1])]
        k = self.pool_kernel
        return F.max_pool2d(y, k, k, ceil_mode=True) if k > 1 else y

    def forward(self, image: torch.Tensor | Any) -> torch.Tensor:
        if len(image.shape) != 4:
            raise GigaslideError(f"expected an image batch [B, C, H, W], got shape {tuple(image.shape)}",
                                 fix="add a batch dimension: image[None]")
        check_modes(self.trunk)
        tiles = self.tiles((int(image.shape[-2]), int(image.shape[-1])))
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        wants_input = isinstance(image, torch.Tensor) and image.requires_grad
        needs_grad = torch.is_grad_enabled() and (bool(params) or wants_input)
        if not needs_grad:
            with torch.no_grad():
                return _stitch(self, image, tiles)
        return _StreamFunction.apply(image, self, tiles, *params)


def _checkpoint_blocks(trunk: nn.Module) -> int:
    """Give every block (a non-Sequential child of a Sequential that holds convolutions) a forward that
    checkpoints its activations while autograd records; returns how many blocks were wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def ckpt_forward(block_forward: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(block_forward, x, use_reentrant=False)
        return block_forward(x)

    blocks = [b for seq in trunk.modules() if isinstance(seq, nn.Sequential) for b in seq
              if not isinstance(b, nn.Sequential) and any(isinstance(c, nn.Conv2d) for c in b.modules())]
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}  # e.g. a block's downsample conv
    n = 0
    for block in blocks:
        if id(block) in inner or getattr(block, "_gigaslide_ckpt", False):
            continue
        block.forward = functools.partial(ckpt_forward, block.forward)  # instance attribute: state_dict unchanged
        block._gigaslide_ckpt = True
        n += 1
    return n


def trim_freed_memory(threshold: int = 1 << 20) -> bool:
    """glibc: serve allocations of ``threshold`` bytes or more with ``mmap`` and trim the heap above it, so
    large buffers freed between tiles are returned to the OS at once. False where unavailable."""
    return set_malloc_thresholds(threshold, threshold)


class _CheckpointedChain(nn.Module):
    """Modules applied one after another; while autograd records, only the chain's input is kept and
    its activations are recomputed in backward. Holds references: parameters stay the trunk's."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.chain = list(mods)  # a plain list: not registered twice as sub-modules

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.chain:
            x = m(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self._run, x, use_reentrant=False) if torch.is_grad_enabled() else self._run(x)


def _checkpoint_stem(trunk: nn.Module) -> nn.Module | None:
    """A graph module running ``trunk`` with its stem checkpointed as one segment, or None.

    The stem is the chain of top-level children before the first ``nn.Sequential`` stage (a ResNet's
    conv1 -> bn1 -> act -> maxpool): at full resolution its saved activations (conv and BatchNorm
    outputs, max-pool indices) outweigh everything the per-block checkpoints keep. The trunk is traced
    with its top-level children as leaves; the graph calls the same module objects, so parameters,
    gradients and ``state_dict`` stay the trunk's. Trunks without such a chain run unchanged (None).
    """

    class TopLevel(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return "." not in qualname

    try:
        graph = TopLevel().trace(trunk)
    except Exception:  # noqa: BLE001 - untraceable at the top level: keep the plain trunk
        return None
    nodes = list(graph.nodes)
    if any(n.op == "get_attr" for n in nodes):
        return None  # tensors of the trunk itself: .to(device) would replace them under the graph's feet
    chain: list[fx.Node] = []
    prev = next((n for n in nodes if n.op == "placeholder"), None)
    stage_follows = False
    for n in nodes:
        if n.op == "placeholder":
            continue
        mod = trunk.get_submodule(str(n.target)) if n.op == "call_module" else None
        stage_follows = isinstance(mod, nn.Sequential) and n.args == (prev,)
        if mod is None or stage_follows or n.args != (prev,) or n.kwargs or len(prev.users) != 1:
            break
        chain.append(n)
        prev = n
    mods = [trunk.get_submodule(str(n.target)) for n in chain]
    if not stage_follows or len(chain) < 2 or not any(isinstance(c, nn.Conv2d) for m in mods for c in m.modules()):
        return None  # no stem in front of a stage (e.g. a plain Sequential of layers)
    root: dict[str, Any] = {str(n.target): trunk.get_submodule(str(n.target)) for n in nodes if n.op == "call_module"}
    root["_gigaslide_stem"] = _CheckpointedChain(mods)
    with graph.inserting_before(chain[0]):
        call = graph.call_module("_gigaslide_stem", (chain[0].args[0],))
    chain[-1].replace_all_uses_with(call)
    for n in reversed(chain):
        graph.erase_node(n)
    return fx.GraphModule(root, graph)


def _crop(image: torch.Tensor | Any, rows: slice, cols: slice) -> torch.Tensor:
    """A crop of a tensor or of a crop source (see the module docstring)."""
    return image[..., rows, cols] if isinstance(image, torch.Tensor) else image.crop(rows, cols)


def _out_box(t: Tile, k: int) -> tuple[slice, slice]:
    """Where a tile's (pooled) exact outputs go in the returned map."""
    return (slice(t.rows.out_start // k, -(-t.rows.out_stop // k)), slice(t.cols.out_start // k, -(-t.cols.out_stop // k)))


def _stitch(stream: StreamingCNN, image: torch.Tensor | Any, tiles: Sequence[Tile]) -> torch.Tensor:
    out_h, out_w = stream.output_size((int(image.shape[-2]), int(image.shape[-1])))
    out: torch.Tensor | None = None
    for t in tiles:
        y = stream.exact_output(_crop(image, slice(t.rows.start, t.rows.stop), slice(t.cols.start, t.cols.stop)), t)
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], out_h, out_w)).contiguous()
        r, c = _out_box(t, stream.pool_kernel)
        out[..., r, c] = y
        del y
    assert out is not None
    return out


class _StreamFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, image: torch.Tensor | Any, stream: StreamingCNN, tiles: list[Tile], *params: torch.Tensor) -> torch.Tensor:
        dev = next((p.device.type for p in stream.trunk.parameters()), "cpu")  # where the trunk runs
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        # the transform of *this* forward: another forward may set stream.transform (e.g. the next slide's
        # augmentation) before this graph is back-propagated
        ctx.stream, ctx.tiles, ctx.transform = stream, tiles, stream.transform
        ctx.is_tensor = isinstance(image, torch.Tensor)
        if ctx.is_tensor:
            ctx.save_for_backward(image, *params)
        else:  # a crop source: kept as it is (it holds the image once; crops are made again in backward)
            ctx.source = image
            ctx.save_for_backward(*params)
        with torch.no_grad():
            return _stitch(stream, image, tiles)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.is_tensor:
            image, *params = ctx.saved_tensors
        else:
            image, params = ctx.source, list(ctx.saved_tensors)
        stream: StreamingCNN = ctx.stream
        want_image = bool(ctx.needs_input_grad[0]) and ctx.is_tensor
        want = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        grads: list[torch.Tensor | None] = [None] * len(want)
        grad_image = torch.zeros_like(image) if want_image else None
        dev, enabled, dtype = ctx.autocast
        for t in ctx.tiles:
            rows, cols = slice(t.rows.start, t.rows.stop), slice(t.cols.start, t.cols.stop)
            r, c = _out_box(t, stream.pool_kernel)
            g = grad_out[..., r, c]
            crop = _crop(image, rows, cols).detach()
            if want_image:
                crop.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                y = stream.exact_output(crop, t, ctx.transform)
            inputs = want + ([crop] if want_image else [])
            got = torch.autograd.grad(y, inputs, g.to(y.dtype), allow_unused=True)
            for i, gi in enumerate(got[: len(want)]):
                if gi is not None:
                    grads[i] = gi if grads[i] is None else grads[i].add_(gi)
            if want_image and got[-1] is not None:
                grad_image[..., rows, cols] += got[-1]
            del y, got, crop
        it = iter(grads)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (grad_image, None, None, *param_grads)
