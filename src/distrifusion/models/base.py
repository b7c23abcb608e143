"""What every model adapter provides, and the input-slicing helpers they share.

An adapter holds the facts of one model family: which modules get patch-parallel layers, how
the model's inputs map to rows of the image, how the call is cut into this rank's share and how
the output strips are put back together. It holds no state: the model's `ParallelState` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..engine.caches import refuse_caches
from ..engine.config import ParallelConfig
from ..engine.hooks import inner_forward, refuse_hooks, set_inner_forward
from ..engine.layers import PatchProcessor
from ..engine.state import ParallelState, Partition

PATCH_PROCESSORS = (PatchProcessor,)
"""The engine's attention processors (the engine's own and adapters' ones derive from `PatchProcessor`)."""


class ModelAdapter:
    """Base of the per-family adapters (see `distrifusion.models`)."""

    models: tuple[type, ...] = ()
    """The diffusers model classes this adapter parallelises."""
    refused: dict[str, str] = {}
    """Related model classes (by name: not every diffusers version has them) that the adapter does not
    parallelise, and why: refused with that reason rather than as an unknown model."""
    sample_arg: str = "sample"
    """The forward argument that carries the noisy image (latent or tokens)."""
    timestep_arg: str = "timestep"
    """The forward argument that carries the timestep."""
    output_dim: int = 2
    """The dimension of the output along which strips are stacked (2: rows of a map, 1: tokens)."""
    row_unit: str = "rows"
    """What the split's rows are, for error messages (rows of the model's input, or token rows)."""
    split_axis: str = "image height"
    """The extent that is split into strips, for error messages ("image height"; a video's frames)."""
    joint_text: bool = False
    """Whether image and text tokens attend jointly (so text tokens can be sharded among ranks)."""
    conditioning_args: tuple[str, ...] = ()
    """The forward arguments that tell a pipeline's guidance branches apart (the prompt, the class, the
    layers to skip): calls that differ in them keep separate stale context (`ParallelState.enter_branch`).
    Not the noisy input, the timestep, or per-step extras such as ControlNet residuals."""
    uses_groupnorm: bool = False
    always_sync: bool = False
    """Whether every call is synchronous whatever the config's mode (a VAE: one call per image,
    no previous step to borrow from)."""
    default_size: tuple[int, int] | None = None
    """(height, width) in pixels that the family's pipelines make by default, for `mode="auto"` on a bare
    model whose config has no `sample_size` (None: such a model needs `ParallelConfig.auto_size`)."""
    halo_convs: bool = False
    """Whether the adapter gives every conv taller than one row its halo rows (UNets, VAEs); else
    only convs whose windows do not overlap (a transformer's patch embedding) are accepted."""

    def noise_level(self, t: float) -> float:
        """A call's timestep (`first_time`) as a number that falls from step to step of one image: a rise
        tells the engine a new image began (`ParallelState.begins_image`). Most pipelines pass a falling
        timestep; a family whose pipelines pass a rising one (Z-Image: (1000 - t) / 1000) overrides this."""
        return t

    def configured(self, model: nn.Module, config: ParallelConfig) -> ModelAdapter:
        """The adapter for this model and config (a video family: split in rows or in frames, `video_split`)."""
        return self

    def check_model(self, model: nn.Module) -> None:
        """Refuse the model, before anything runs, if a layer cannot be split into strips: the
        family's own rules (`check`) and, for every family, the layers that read across rows (but those the
        adapter owns, `own_layers`) and the hooks whose decisions depend on a rank's strip
        (`distrifusion.engine.hooks`)."""
        own = {id(module) for module in self.own_layers(model)}
        for name, module in model.named_modules():
            if id(module) not in own:
                refuse_row_crossing(name, module, self.halo_convs)
        refuse_hooks(model)
        refuse_caches(model)
        self.check(model)

    def own_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers that read across rows in a way `refuse_row_crossing` refuses, but which this adapter
        splits itself (and validates in `check`): none by default."""
        return []

    def entries(self, model: nn.Module) -> list[tuple[str, ModelAdapter]]:
        """The model's methods that each run one split call, with the adapter that splits it
        (a denoiser: its forward; a VAE: its encode and decode)."""
        return [("forward", self)]

    def check_pipeline_call(self, pipe, arguments: dict) -> None:
        """Refuse a pipeline call (its arguments, defaults filled in) that the pipeline would take but
        silently change into another (Wan: a frame count that is not 1 + 4k): raised on every rank alike,
        before any work."""

    def runs_whole(self, model: nn.Module, inputs: dict) -> bool:
        """Whether this call must run unsplit on every rank (e.g. a VAE with diffusers' tiling on,
        whose tiles would otherwise see strips)."""
        return False

    def check(self, model: nn.Module) -> None:
        """Refuse, before anything runs, layers whose semantics cannot be split into strips."""

    def block_rows(self, model: nn.Module) -> int:
        """Rows that every strip must be a multiple of."""
        raise NotImplementedError

    def install(self, model: nn.Module, state: ParallelState) -> None:
        """Put the patch-parallel layers on the model's modules (undone by `parallelize.remove`).

        Runs again whenever the model changed after `parallelize` (see `distrifusion.ownership`):
        it must leave this state's layers in place and bring only new modules under the engine
        (`install_forward` and `install_processor` do)."""
        raise NotImplementedError

    def switches(self, model: nn.Module) -> tuple:
        """Settings that are not modules but decide which layers exchange context (a UNet: whether
        FreeU is on). Read before every split call: must be cheap."""
        return ()

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        """(batch, rows, columns) of the call's image, validated identically on every rank."""
        raise NotImplementedError

    def text_tokens(self, inputs: dict) -> int:
        """Text tokens that attend jointly with the image tokens (0 if none)."""
        return 0

    def text_masked(self, inputs: dict) -> bool:
        """Whether the call's text tokens carry a mask over the keys (see `Partition.text_mask`)."""
        return False

    def extra_tokens(self, inputs: dict, rows: int, cols: int) -> int:
        """Reference-image tokens after the image's `rows` x `cols` tokens (see `Partition.extra`): they
        condition the image but are not rows of it (0 if none)."""
        return 0

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        """This rank's share of the call: its batch half, its strip, its text tokens."""
        raise NotImplementedError

    def sample_tensor(self, inputs: dict) -> torch.Tensor:
        """The call's noisy input as one tensor (for the ranks' check that they all got the same)."""
        return inputs[self.sample_arg]

    def output_tensor(self, sample) -> torch.Tensor:
        """The model's output sample as one tensor, whose strips `output_dim` stacks (a model that
        returns a list of images: stacked)."""
        return sample

    def output_sample(self, full: torch.Tensor):
        """The gathered output back in the form the model returns (inverse of `output_tensor`)."""
        return full

    def split_output(self, local: torch.Tensor, partition: Partition) -> torch.Tensor:
        """This rank's output tensor (`output_tensor`) in a layout whose `output_dim` stacks the ranks' strips
        (default: as it is; packed video tokens of a band of rows across all frames: one run per frame)."""
        return local

    def join_output(self, full: torch.Tensor, partition: Partition) -> torch.Tensor:
        """The gathered output back in the model's layout (the inverse of `split_output`)."""
        return full

    def timestep_tensor(self, model: nn.Module, t: int | float) -> torch.Tensor:
        """A timestep given as a number, as the tensor the model itself would make of it (a CUDA
        graph would otherwise bake the number in)."""
        return torch.tensor(t, dtype=torch.float64 if isinstance(t, float) else torch.int64)


class PackedTokensAdapter(ModelAdapter):
    """Transformers on packed image tokens (2x2 latent cells per token, packed by the pipeline: Flux.1,
    Flux.2, Qwen-Image): strips of whole token rows, output tokens gathered along dim 1, joint attention
    with `encoder_hidden_states`, reference-image tokens (if any) after the image's."""

    sample_arg = "hidden_states"
    output_dim = 1
    row_unit = "token rows"
    joint_text = True
    # FluxPipeline, Flux2Pipeline, QwenImagePipeline: default_sample_size 128 latent cells of 8 px (the
    # transformers' configs have no sample_size).
    default_size = (1024, 1024)

    def block_rows(self, model: nn.Module) -> int:
        return 1

    def text_tokens(self, inputs: dict) -> int:
        return inputs["encoder_hidden_states"].shape[1]

    def extra_tokens(self, inputs: dict, rows: int, cols: int) -> int:
        return inputs["hidden_states"].shape[1] - rows * cols


def batch_slice(partition: Partition) -> slice:
    """This rank's half of the batch (the whole batch without a CFG split)."""
    return slice(partition.cfg_index * partition.local_batch, (partition.cfg_index + 1) * partition.local_batch)


def strip_rows(partition: Partition) -> tuple[int, int]:
    """First and last-plus-one row of this rank's strip."""
    return partition.row_start, partition.row_start + partition.rows[partition.patch_rank]


def strip_tokens(value, partition: Partition, dim: int = 1):
    """This rank's image tokens of `value` (tokens along `dim`, row-major, then the reference tokens):
    its strip's rows, then its reference tokens (its share, or all of them: `Partition.extra`)."""
    if value is None:
        return None
    start, end = (r * partition.width for r in strip_rows(partition))
    strip = slice_tokens(value, start, end, dim)
    if not partition.extra:
        return strip
    first = partition.height * partition.width
    if partition.sharded_text:
        first += sum(partition.extra[: partition.patch_rank])
    return torch.cat([strip, slice_tokens(value, first, first + partition.extra[partition.patch_rank], dim)], dim)


def shard_text(local: dict, partition: Partition, text: str, ids: str | None = None) -> dict:
    """With sharded text tokens: cut the text input (batch, tokens, c) and its position ids
    (tokens, 3) to this rank's share; otherwise return `local` unchanged."""
    if not partition.sharded_text:
        return local
    start = sum(partition.text[: partition.patch_rank])
    end = start + partition.text[partition.patch_rank]
    local[text] = slice_tokens(local[text], start, end)
    if ids is not None:
        local[ids] = slice_tokens(local[ids], start, end, dim=local[ids].dim() - 2)
    return local


def check_packed(family: str, tokens: torch.Tensor) -> None:
    """Refuse packed image tokens that are not (batch, tokens, channels)."""
    if tokens.dim() != 3:
        raise ValueError(
            f"distrifusion: {family} expects packed tokens (batch, tokens, channels), got {tuple(tokens.shape)}"
        )


def image_map_grid(sample: torch.Tensor) -> tuple[int, int, int]:
    """(batch, rows, columns) of a (batch, channels, height, width) latent."""
    if sample.dim() != 4:
        raise ValueError(
            f"distrifusion: expected a 4-D latent (batch, channels, height, width), got {tuple(sample.shape)}"
        )
    return sample.shape[0], sample.shape[2], sample.shape[3]


def slice_batch(value, partition: Partition):
    """`value` (a tensor, or dicts/lists of them) cut to this rank's batch half; other values unchanged."""
    if isinstance(value, dict):
        return {k: slice_batch(v, partition) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(slice_batch(v, partition) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == partition.batch:
        return value[batch_slice(partition)]
    return value


def slice_tokens(value, start: int, end: int, dim: int = 1):
    """Tokens [start, end) of `value` along `dim` (tensors, or lists of them)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(slice_tokens(v, start, end, dim) for v in value)
    return value.narrow(dim, start, end - start)


def refuse_inputs(family: str, inputs: dict, names: Iterable[str], why: str) -> None:
    """Raise for any of `names` given (not None): inputs this adapter cannot split."""
    for name in names:
        if inputs.get(name) is not None:
            raise ValueError(f"distrifusion: {family} input {name!r} is not supported: {why}")


def check_kwargs_dict(family: str, inputs: dict, name: str) -> None:
    """Attention kwargs may carry a LoRA scale (the same on every strip), nothing else."""
    extra = sorted(set(inputs.get(name) or {}) - {"scale"})
    if extra:
        raise ValueError(
            f"distrifusion: {family} {name} {extra} cannot be split into strips "
            "(only a LoRA 'scale' is supported); leave them out or run without distrifusion"
        )


def install_forward(module: nn.Module, layer: type, name: str, state: ParallelState, method: str = "forward") -> None:
    """Make `layer(module, name, state)` the module's forward (beneath its diffusers hooks, if any) or its
    other `method`, unless this state's already is. `remove` deletes it again (every engine layer holds the
    state)."""
    current = inner_forward(module) if method == "forward" else module.__dict__.get(method)
    if not (isinstance(current, layer) and current.state is state):
        made = layer(module, name, state)
        if method == "forward":
            set_inner_forward(module, made)
        else:
            setattr(module, method, made)


def install_processor(attn: nn.Module, state: ParallelState, make: Callable) -> None:
    """Wrap the attention's processor in `make(processor)` (a patch-parallel processor), unless this
    state's already is. A patch-parallel processor that is not (made unbound by a diffusers loader)
    gives up the processor it stands for."""
    current = attn.processor
    if isinstance(current, PATCH_PROCESSORS):
        if current.state is state:
            return
        current = current.original
    attn.set_processor(make(current))


UNSPLIT_LAYERS = ("AdaGroupNorm", "SpatialNorm", "FirDownsample2D", "FirUpsample2D", "KDownsample2D", "KUpsample2D")
"""diffusers layers that read across rows in ways the engine does not split (statistics over the whole
map, FIR or transposed-conv resampling done with functions inside their forward). By class name: not
every diffusers version has all of them."""
_PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.CircularPad2d)


def refuse_row_crossing(name: str, module: nn.Module, halo_convs: bool) -> None:
    """Raise for a layer that would read rows of other strips without the engine knowing, which would
    give a wrong image with no error: a strip's edge is not the image's edge."""
    kind, why = type(module).__name__, None
    if kind in UNSPLIT_LAYERS:
        why = "not supported"
    elif isinstance(module, (nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d)) or (
        isinstance(module, (nn.Conv2d, nn.Conv3d)) and not halo_convs
    ):  # rows: the second-to-last axis of a 2D or 3D window
        kernel, stride, padding = (_pair(getattr(module, a))[-2] for a in ("kernel_size", "stride", "padding"))
        if (kernel > 1 or padding) and not (kernel == stride and padding == 0):
            why = f"its {kernel}-row windows (stride {stride}, padding {padding}) cross strip edges"
    elif isinstance(module, _PADS) and any(module.padding[2:]):  # (left, right, top, bottom)
        why = "it pads rows at every strip's edge"
    elif isinstance(module, (nn.InstanceNorm2d, nn.LocalResponseNorm)):
        why = "its statistics span the whole map"
    elif isinstance(module, nn.Upsample) and module.mode not in ("nearest", "nearest-exact"):
        why = f"{module.mode} interpolation reads the rows beyond a strip's edge"
    if why:
        raise TypeError(f"distrifusion: layer {name!r} ({kind}) cannot be split into strips: {why}")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def check_processor(name: str, attn: nn.Module, allowed: tuple[type, ...]) -> None:
    """Refuse an attention whose processor is not one the engine knows how to split."""
    # The exact classes: a subclass may compute something else (or record attention maps) in its __call__.
    # The engine's own (after a change to the model, installed again) are accepted.
    if type(attn.processor) not in allowed and not isinstance(attn.processor, PATCH_PROCESSORS):
        raise TypeError(
            f"distrifusion: attention {name!r} uses {type(attn.processor).__name__}, which cannot be split into "
            f"strips; supported: {', '.join(a.__name__ for a in allowed)}. Set one "
            "(e.g. model.set_default_attn_processor()) before the next call"
        )
