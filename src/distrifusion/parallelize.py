"""`parallelize`: turn an ordinary single-device diffusers model or pipeline into one rank's part
of a patch-parallel model, in a few documented steps (see `parallelize_model`)."""

from __future__ import annotations

import inspect
import logging
from functools import partial

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from torch import nn

from .comm import Runtime, init_runtime
from .config import ParallelConfig
from .graphs import CudaGraphs, ReplayWatchdog
from .layers import PatchAttnProcessor, PatchConv2d, PatchGroupNorm, tensor_version
from .state import ParallelState, Plan, split_rows

log = logging.getLogger("distrifusion")

SUPPORTED_MODELS = (UNet2DConditionModel, UNet2DModel)
_STATE_ATTR = "_distrifusion_state"


def parallelize(pipe_or_model, config: ParallelConfig | None = None, *, runtime: Runtime | None = None):
    """Make `pipe_or_model` compute only this rank's strip of every denoising step.

    Accepts a diffusers pipeline with a `.unet` or a bare `UNet2DConditionModel`/`UNet2DModel`,
    and returns the same object, moved to this rank's device (`cuda:LOCAL_RANK` when CUDA is
    available, else the CPU). Under torchrun it initialises the process group if needed (nccl on
    CUDA, gloo on CPU); in a plain process it runs alone and its results are unchanged.

    The model keeps its call signature: every rank passes the full inputs (same seed on every
    rank) and receives the full output. A bare model counts its calls as denoising steps; call
    `reset` before each new image. A pipeline restarts its count at every call.
    """
    config = config or ParallelConfig()
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a distrifusion.ParallelConfig, got {type(config).__name__}")
    model = getattr(pipe_or_model, "unet", pipe_or_model)
    if not isinstance(model, SUPPORTED_MODELS):
        raise TypeError(
            f"distrifusion supports {', '.join(m.__name__ for m in SUPPORTED_MODELS)} and pipelines whose "
            f".unet is one of them; got {type(pipe_or_model).__name__}"
            + (f" with a {type(model).__name__}" if model is not pipe_or_model else "")
        )
    if hasattr(model, _STATE_ATTR):
        raise ValueError("this model is already parallelised; call distrifusion.remove() first")
    check_supported_layers(model)
    runtime = runtime or init_runtime(config.timeout_s)
    pipe_or_model.to(runtime.device)
    parallelize_model(model, config, runtime)
    if model is not pipe_or_model:
        _wrap_pipeline(pipe_or_model, runtime)
    return pipe_or_model


def parallelize_model(model: nn.Module, config: ParallelConfig, runtime: Runtime) -> ParallelState:
    """Install the patch-parallel pieces on `model`, in this order:

    1. one `ParallelState` (split, step, exchanged context) attached to the model;
    2. convs with a kernel taller than one row get halos (`PatchConv2d`);
    3. every GroupNorm gets whole-image statistics (`PatchGroupNorm`);
    4. every attention gets `PatchAttnProcessor` (self-attention over all strips' keys/values;
       cross-attention unchanged);
    5. the model's forward splits its inputs, runs the strip and gathers the output, as a CUDA
       graph per image size and phase where `config.cuda_graphs` allows.
    Everything else (1x1 convs, linears, activations, up/down-sampling, skips, embeddings)
    is already local to a strip.
    """
    state = ParallelState(config, block_rows(model), runtime)
    if use_cuda_graphs(config, runtime):
        watchdog = ReplayWatchdog(config.timeout_s, runtime.rank) if runtime.world_size > 1 else None
        agree = partial(_everywhere, runtime)
        state.graphs = CudaGraphs(runtime.device, agree=agree, abort=state.abort_step, watchdog=watchdog)
    setattr(model, _STATE_ATTR, state)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            module.forward = PatchConv2d(module, name, state)
        elif isinstance(module, nn.GroupNorm):
            module.forward = PatchGroupNorm(module, name, state)
        elif isinstance(module, Attention):
            module.set_processor(PatchAttnProcessor(module, name, state, module.processor))
    model.forward = _ParallelForward(model, state)
    return state


def _everywhere(runtime: Runtime, ok: bool) -> bool:
    """Whether `ok` holds on every rank (a collective: every rank must ask)."""
    flags = runtime.world.all_gather(torch.tensor([float(ok)], device=runtime.device)).wait()
    return bool(flags.min().item() > 0)


def use_cuda_graphs(config: ParallelConfig, runtime: Runtime) -> bool:
    """Whether steps run as CUDA graphs: they need a CUDA device and capturable collectives."""
    comms = [runtime.world, *runtime.patch_groups.values()]
    possible = runtime.device.type == "cuda" and all(getattr(c, "capturable", False) for c in comms)
    if config.cuda_graphs and not possible:
        raise ValueError(
            "distrifusion: cuda_graphs=True needs a CUDA device and collectives that a graph can capture "
            f"(nccl, or one rank); this rank runs on {runtime.device} with "
            f"{', '.join(sorted({type(c).__name__ for c in comms}))}. Use cuda_graphs=None or False."
        )
    return possible if config.cuda_graphs is None else config.cuda_graphs


def remove(pipe_or_model) -> None:
    """Undo `parallelize`: restore the original forwards and attention processors."""
    model = getattr(pipe_or_model, "unet", pipe_or_model)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    state.release()
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (PatchConv2d, PatchGroupNorm, _ParallelForward)):
            del module.forward
        if isinstance(module, Attention) and isinstance(module.processor, PatchAttnProcessor):
            module.set_processor(module.processor.original)
    delattr(model, _STATE_ATTR)
    base = getattr(type(pipe_or_model), "_distrifusion_base", None)
    if base is not None:
        pipe_or_model.__class__ = base


def reset(pipe_or_model, *, drop_graphs: bool = False) -> None:
    """Start a new image: the next call is step 0 (synchronous) and no stale context remains.

    CUDA graphs are re-captured by themselves when weights were changed or replaced; changes that
    alter the computation without touching a weight (FreeU, a LoRA scale, switching adapters) need
    `drop_graphs=True`.
    """
    model = getattr(pipe_or_model, "unet", pipe_or_model)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("reset() needs a model or pipeline returned by distrifusion.parallelize()")
    state.reset()
    if state.graphs is not None:
        # Graphs read the weights' memory: replaced or modified weights need new graphs (and the fused
        # key/value projections a refresh, which the first eager step does).
        weights = tuple((p.data_ptr(), tensor_version(p)) for p in model.parameters())
        if weights != state.graph_weights or drop_graphs:
            state.graphs.clear()
            state.graph_weights = weights


def block_rows(model: nn.Module) -> int:
    """Latent rows that every strip must be a multiple of: the model's total downsampling."""
    downsamplers = sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))
    return 2**downsamplers


def check_supported_layers(model: nn.Module) -> None:
    """Refuse, before anything runs, layers whose semantics cannot be split into strips."""
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("AdaGroupNorm", "SpatialNorm", "FirDownsample2D", "KDownsample2D", "FirUpsample2D"):
            raise TypeError(f"distrifusion: layer {name!r} ({kind}) is not supported")
        if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
            raise TypeError(f"distrifusion: downsampler {name!r} pads asymmetrically (padding=0), not supported")
        if isinstance(module, Attention) and not isinstance(module.processor, (AttnProcessor, AttnProcessor2_0)):
            raise TypeError(
                f"distrifusion: attention {name!r} uses {type(module.processor).__name__}; only the default "
                "processors (AttnProcessor2_0, AttnProcessor) are supported"
            )
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            PatchConv2d(module, name, None)  # validates padding and stride


def _wrap_pipeline(pipe, runtime: Runtime) -> None:
    """Restart the step count at every pipeline call and show progress on rank 0 only."""
    cls = type(pipe)
    if cls not in _PIPELINE_CLASSES:

        def __call__(self, *args, **kwargs):
            reset(self)
            return cls.__call__(self, *args, **kwargs)

        _PIPELINE_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_distrifusion_base": cls})
    pipe.__class__ = _PIPELINE_CLASSES[cls]
    if runtime.rank != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


_PIPELINE_CLASSES: dict[type, type] = {}


class _ParallelForward:
    """The model's forward: split the inputs, run this rank's strip, gather the full output."""

    def __init__(self, model: nn.Module, state: ParallelState) -> None:
        self.model, self.state = model, state
        self.signature = inspect.signature(type(model).forward)
        self.original = type(model).forward
        self.noticed_no_split = False

    def __call__(self, *args, **kwargs):
        state = self.state
        if state.runtime.world_size == 1 and state.graphs is None:  # exactly the original model
            return self.original(self.model, *args, **kwargs)
        bound = self.signature.bind(self.model, *args, **kwargs)
        inputs = {k: v for k, v in bound.arguments.items() if k != "self"}
        if state.graphs is not None and isinstance(inputs.get("timestep"), (int, float)):
            # A number would be baked into the graph: make it the tensor the model itself would make of it.
            t = inputs["timestep"]
            if isinstance(self.model, UNet2DModel):
                inputs["timestep"] = torch.tensor(t, dtype=torch.long)
            else:
                inputs["timestep"] = torch.tensor(t, dtype=torch.float64 if isinstance(t, float) else torch.int64)
        if state.runtime.world_size == 1:
            full, kind = state.graphs("solo", self.run_local, inputs)
            return self.output(full, kind)
        sample = inputs["sample"]
        plan = self.plan(sample)
        state.begin_step(plan)
        if state.step == 0:
            self.check_same_inputs(sample, inputs.get("timestep"))
        batch = slice(plan.cfg_index * plan.local_batch, (plan.cfg_index + 1) * plan.local_batch)
        rows = (plan.row_start, plan.row_start + plan.rows[plan.patch_rank])
        inputs = {k: _local(v, plan.batch, plan.height, plan.width, batch, rows) for k, v in inputs.items()}
        if state.graphs is None:
            full, kind = self.run_split(inputs)
        else:
            full, kind = state.graphs(("sync" if state.sync_step else "displaced", plan), self.run_split, inputs)
        state.step += 1
        return self.output(full, kind)

    def run_local(self, inputs: dict) -> tuple[torch.Tensor, type]:
        """The original forward on this rank's inputs: (output sample, output type)."""
        bound = inspect.BoundArguments(self.signature, {"self": self.model, **inputs})
        out = self.original(*bound.args, **bound.kwargs)
        return (out[0], tuple) if isinstance(out, tuple) else (out.sample, type(out))

    def run_split(self, inputs: dict) -> tuple[torch.Tensor, type]:
        """This rank's strip of one step and the gathered full output: the work a graph captures."""
        local, kind = self.run_local(inputs)
        self.state.end_step()
        full = self.gather(local, self.state.plan)
        if self.state.graphs is not None:
            self.state.exchange.settle()  # a graph must not leave collectives in flight
        return full, kind

    @staticmethod
    def output(sample: torch.Tensor, kind: type):
        return (sample,) if kind is tuple else kind(sample=sample)

    def plan(self, sample: torch.Tensor) -> Plan:
        """Validate the call's shape (identically on every rank, before any collective) and split it."""
        state, runtime, config = self.state, self.state.runtime, self.state.config
        if sample.dim() != 4:
            raise ValueError(
                f"distrifusion: expected a 4-D latent (batch, channels, height, width), got {tuple(sample.shape)}"
            )
        batch, _, height, width = sample.shape
        world = runtime.world_size
        can_split = world % 2 == 0 and batch % 2 == 0
        if config.split_cfg == "force" and not can_split:
            raise ValueError(
                f"distrifusion: split_cfg='force' needs an even world size and an even batch; got world size "
                f"{world} and batch {batch}. Use split_cfg=True to fall back to one group."
            )
        cfg_groups = 2 if (config.split_cfg and can_split) else 1
        if config.split_cfg and not can_split and world > 1 and not self.noticed_no_split:
            log.info(
                "distrifusion: batch %d over %d ranks cannot be split in CFG halves; using one group", batch, world
            )
            self.noticed_no_split = True
        patch_size = world // cfg_groups
        block = state.block
        if height % block:
            raise ValueError(
                f"distrifusion: latent height {height} must be a multiple of the model's block of {block} rows"
            )
        if height < patch_size * block:
            raise ValueError(
                f"distrifusion: latent height {height} is too small to split over {patch_size} ranks; the minimum "
                f"is {patch_size * block} rows ({block} per rank). Use a larger height or fewer ranks."
            )
        return Plan(
            batch,
            height,
            width,
            cfg_groups,
            runtime.cfg_index(cfg_groups) if cfg_groups == 2 else 0,
            runtime.rank % patch_size,
            split_rows(height, block, patch_size),
        )

    def check_same_inputs(self, sample: torch.Tensor, timestep) -> None:
        """Refuse inputs that differ between ranks (e.g. latents drawn without a shared seed)."""
        if sample.device.type == "meta":
            return  # a shape-only run (bench counting traffic) has no values to compare
        t = torch.as_tensor(timestep, device=sample.device).double().sum()
        summary = torch.stack([sample.double().sum(), sample.double().abs().sum(), t])
        gathered = self.state.runtime.world.all_gather(summary).wait()
        if not torch.equal(gathered.amin(0), gathered.amax(0)):
            raise ValueError(
                "distrifusion: the model inputs differ between ranks; every rank must pass the same latent "
                "and timestep (use the same seed/generator on every rank)"
            )

    def gather(self, local: torch.Tensor, plan: Plan) -> torch.Tensor:
        """All-gather every rank's output strip into the full output on every rank."""
        biggest = max(plan.rows)
        pad = biggest - local.shape[2]
        if pad:
            local = torch.cat([local, local.new_zeros(*local.shape[:2], pad, local.shape[3])], 2)
        parts = self.state.runtime.world.all_gather(local).wait()
        groups = [parts[g * plan.patch_size : (g + 1) * plan.patch_size] for g in range(plan.cfg_groups)]
        return torch.cat(
            [torch.cat([strip[:, :, :rows] for strip, rows in zip(group, plan.rows)], 2) for group in groups], 0
        )


def _local(value, batch: int, height: int, width: int, batch_slice: slice, rows: tuple[int, int]):
    """This rank's part of one forward argument: its batch half, and its rows of spatial maps."""
    if isinstance(value, dict):
        return {k: _local(v, batch, height, width, batch_slice, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v, batch, height, width, batch_slice, rows) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    value = value[batch_slice]
    # Spatial maps (the latent, ControlNet residuals) at any level of the UNet: slice their rows.
    if value.dim() == 4 and height % value.shape[2] == 0 and width % value.shape[3] == 0:
        factor = height // value.shape[2]
        if width // value.shape[3] == factor:
            value = value[:, :, rows[0] // factor : rows[1] // factor]
    return value
