"""`parallelize`: turn an ordinary single-device diffusers model or pipeline into one rank's part
of a patch-parallel model, in a few documented steps (see `parallelize_model`). The life of one call
(split → exchange → gather) is told in docs/ARCHITECTURE.md."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
import zlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..engine.caches import stateful_caches, unbind_caches
from ..engine.comm import Runtime, init_runtime, shard_group
from ..engine.config import ParallelConfig
from ..engine.graphs import CudaGraphs, ReplayWatchdog
from ..engine.hooks import hook_names, inner_forward, set_inner_forward
from ..engine.layers import PatchProcessor, pad_to
from ..engine.shard import Sharding, check_shardable
from ..engine.state import ParallelState, Partition, first_time, identity, split_rows, tensor_version
from ..models import ModelAdapter, denoiser_modules, find_denoiser, find_denoisers, find_vae
from .ownership import Ownership
from .text_encoders import check_text_encoders, place_text_encoders, placements, restore_text_encoders

log = logging.getLogger("distrifusion")

_STATE_ATTR = "_distrifusion_state"


ResolveAuto = Callable[[object, nn.Module, ParallelConfig, Runtime], tuple[ParallelConfig, dict]]
"""(pipeline or model, denoiser, config, runtime) -> (the concrete config, the plan it came from)."""


def parallelize(
    pipe_or_model,
    config: ParallelConfig | None = None,
    *,
    runtime: Runtime | None = None,
    resolve_auto: ResolveAuto | None = None,
):
    """Make `pipe_or_model` compute only this rank's strip of every denoising step.

    Accepts a diffusers pipeline whose `.unet` or `.transformer` is a supported model, or the bare
    model (see `distrifusion.models`: UNet2DConditionModel, UNet2DModel, FluxTransformer2DModel,
    SD3Transformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel, ZImageTransformer2DModel),
    and returns the same object, moved to this rank's device (`cuda:LOCAL_RANK` when CUDA is available,
    else the CPU). Under torchrun it initialises the process group if needed (nccl on CUDA, gloo on
    CPU); in a plain process it runs alone and its results are unchanged.

    The model keeps its call signature: every rank passes the full inputs (same seed on every
    rank) and receives the full output. A bare model counts its calls as denoising steps; the pipeline
    given here restarts its count at every call, and any other caller (a pipeline made from its components,
    a bare-model loop) starts a new image when the timestep rises again (`ParallelState.begins_image`);
    `reset` before a new image is always right.

    `ParallelConfig(mode="auto")` needs `resolve_auto`, which the public `distrifusion.parallelize`
    gives (the planner, `distrifusion.measure.planner.resolve_auto`): the engine never imports the tools.
    """
    config = config or ParallelConfig()
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a distrifusion.ParallelConfig, got {type(config).__name__}")
    denoisers = find_denoisers(pipe_or_model)  # a pipeline's experts too (Wan 2.2's transformer_2)
    for model, adapter in denoisers:
        if hasattr(model, _STATE_ATTR):
            raise ValueError("this model is already parallelised; call distrifusion.remove() first")
        adapter.configured(model, config).check_model(model)
    model, adapter = denoisers[0]
    if not adapter.uses_groupnorm and config.groupnorm != ParallelConfig.groupnorm:
        warnings.warn(
            f"distrifusion: ParallelConfig.groupnorm has no effect on {type(model).__name__} (no GroupNorm)",
            stacklevel=2,
        )
    vae, vae_adapter = _pipeline_vae(pipe_or_model, model) if config.split_vae else (None, None)
    if vae_adapter is not None:
        vae_adapter.check_model(vae)
    refuse_offloading(pipe_or_model, config)
    if config.shard_weights is True:
        for each, _ in denoisers:
            check_shardable(each, "the denoiser's")
    runtime = runtime or init_runtime(config.timeout_s)
    if vae is not None and vae_adapter is None:
        _notice_whole_vae(vae, runtime)
    found = None
    if "auto" in (config.mode, config.shard_weights):
        if resolve_auto is None:
            raise ValueError(
                "distrifusion: ParallelConfig(mode='auto' or shard_weights='auto') is planned by "
                "distrifusion.parallelize (it measures the link, each choice and the memory); this lower-level "
                "call needs concrete values"
            )
        config, found = resolve_auto(pipe_or_model, model, config, runtime)
    sharded = config.shard_weights is True and runtime.world_size > 1
    if config.shard_weights is True and runtime.world_size == 1:
        log.info("distrifusion: shard_weights has no effect on one rank")
    chosen = placements(pipe_or_model, config, sharded, runtime.world_size) if model is not pipe_or_model else {}
    check_text_encoders(pipe_or_model, chosen)
    # Sharded, the denoiser never goes to the device whole: FSDP2 moves one block at a time, then keeps its share.
    keep = [each for each, _ in denoisers] if sharded else []
    keep += [getattr(pipe_or_model, name) for name, placement in chosen.items() if placement != "replicated"]
    _to_device(pipe_or_model, runtime.device, keep=tuple(keep))
    if chosen:
        place_text_encoders(pipe_or_model, chosen, config, runtime)
    parallelize_model(model, config, runtime, adapter).auto_plan = found
    for expert, expert_adapter in denoisers[1:]:  # each its own state: its own steps and stale context
        parallelize_model(expert, config, runtime, expert_adapter)
    if vae_adapter is not None:
        parallelize_model(vae, config, runtime, vae_adapter)
    if model is not pipe_or_model:
        _wrap_pipeline(pipe_or_model, runtime)
    return pipe_or_model


def _to_device(pipe_or_model, device: torch.device, keep: tuple = ()) -> None:
    """Move the pipeline (or model) to `device`, except the modules in `keep`."""
    if not keep:
        pipe_or_model.to(device)
        return
    for component in getattr(pipe_or_model, "components", {}).values():
        if isinstance(component, nn.Module) and all(component is not k for k in keep):
            component.to(device)


def refuse_offloading(pipe_or_model, config: ParallelConfig) -> None:
    """Refuse offloading that cannot run under parallelize, in one line naming what to use instead:
    accelerate's hooks (`enable_model_cpu_offload`, `enable_sequential_cpu_offload`) on any component (the
    denoiser's own are refused by `engine.hooks.refuse_hooks`, this covers the text encoders and the VAE:
    parallelize puts each rank's components on its device, which those hooks would fight); and diffusers'
    group offloading together with `shard_weights` (both would move the denoiser's weights; group
    offloading alone runs beneath the engine's layers, `engine.hooks`)."""
    components = getattr(pipe_or_model, "components", None) or {"model": pipe_or_model}
    denoisers = [each for each, _ in find_denoisers(pipe_or_model)]
    for name, component in components.items():
        if not isinstance(component, nn.Module):
            continue
        sharded = config.shard_weights is not False and any(component is each for each in denoisers)
        for module in component.modules():
            kind = None
            if getattr(module, "_hf_hook", None) is not None:
                kind = "accelerate's offloading (enable_model_cpu_offload or enable_sequential_cpu_offload)"
            elif sharded and any("offload" in hook for hook in hook_names(module)):
                kind = f"diffusers' group offloading (enable_group_offload) with shard_weights={config.shard_weights!r}"
            if kind:
                raise ValueError(
                    f"distrifusion: {name} uses {kind}, which cannot run under parallelize; load the pipeline "
                    "without offloading (pipe.remove_all_hooks() undoes model offloading) and use "
                    "ParallelConfig(shard_weights=True) to spread a model too large for one device over the ranks, "
                    "text_encoders='sharded' or 'cpu' for large text encoders"
                )


def _pipeline_vae(pipe_or_model, model: nn.Module) -> tuple[nn.Module | None, ModelAdapter | None]:
    """The pipeline's VAE (not already split) and the adapter that splits it (None: it runs whole)."""
    vae = getattr(pipe_or_model, "vae", None)
    if model is pipe_or_model or not isinstance(vae, nn.Module) or hasattr(vae, _STATE_ATTR):
        return None, None
    return vae, find_vae(vae)


_NOTICED_VAES: set[str] = set()


def _notice_whole_vae(vae: nn.Module, runtime: Runtime) -> None:
    """Say once per VAE class (on rank 0) that a pipeline's VAE no adapter splits runs whole on every rank."""
    kind = type(vae).__name__
    if kind not in _NOTICED_VAES and runtime.rank == 0:
        _NOTICED_VAES.add(kind)
        log.warning("distrifusion: the pipeline's VAE (%s) is not split; every rank decodes the whole output", kind)


def parallelize_model(
    model: nn.Module, config: ParallelConfig, runtime: Runtime, adapter: ModelAdapter | None = None
) -> ParallelState:
    """Install the patch-parallel pieces on `model`, in this order:

    1. one `ParallelState` (split, step, exchanged context) attached to the model;
    2. the family's adapter puts the patch-parallel layers on the modules that look beyond their
       strip (UNets: halo convs, whole-image GroupNorm, self-attention over all strips;
       transformers: joint/self-attention over all strips, whole-image positions);
    3. the model's forward splits its inputs, runs the strip and gathers the output, as a CUDA
       graph per image size and phase where `config.cuda_graphs` allows.
    Everything else (1x1 convs, linears, per-token norms, activations, skips, embeddings) is
    already local to a strip.
    """
    adapter = (adapter or find_denoiser(model)[1]).configured(model, config)
    if adapter.always_sync:
        # "force" is about the denoiser's CFG batch; a VAE call's batch is the images, often one.
        config = dataclasses.replace(config, mode="sync", cuda_graphs=False, split_cfg=bool(config.split_cfg))
    state = ParallelState(config, runtime, keep_buffers=not adapter.always_sync)
    sharded = config.shard_weights is True and runtime.world_size > 1 and not adapter.always_sync
    if sharded:
        check_shardable(model, "the denoiser's")
        state.sharding = Sharding(model, shard_group(runtime, config.shard_group, config.timeout_s), runtime.device)
    if use_cuda_graphs(config, runtime, sharded):
        watchdog = ReplayWatchdog(config.timeout_s, runtime.rank, runtime.device) if runtime.world_size > 1 else None
        agree = partial(_everywhere, runtime)
        state.graphs = CudaGraphs(runtime.device, agree=agree, abort=state.abort_step, watchdog=watchdog)
    setattr(model, _STATE_ATTR, state)
    state.ownership = Ownership(model, adapter, state)
    state.ownership.install()
    for method, entry in adapter.entries(model):
        split = _ParallelForward(model, state, entry, method)
        if method == "forward":  # beneath diffusers' hooks on the model (a cache's, offloading's), as they wrap forward
            set_inner_forward(model, split)
        else:
            setattr(model, method, split)
    if hasattr(type(model), "set_default_attn_processor"):
        model.set_default_attn_processor = _WithOriginalProcessors(model, "set_default_attn_processor")
    return state


class _WithOriginalProcessors:
    """A model method that judges the attention processors by their class: diffusers'
    `set_default_attn_processor` refuses ones it does not know, ours included. The engine's
    processors give theirs back first; the next call brings the model under the engine again
    (see `distrifusion.ownership`)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        self.model, self.original = model, getattr(type(model), method)

    def __call__(self, *args, **kwargs):
        _give_back_processors(self.model)
        return self.original(self.model, *args, **kwargs)


def _give_back_processors(model: nn.Module) -> None:
    """Put back, on every attention, the processor each of the engine's processors stands for."""
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), PatchProcessor):
            module.set_processor(module.processor.original)


def _under_compile() -> bool:
    """Whether torch.compile's frame evaluation is on around this call (a frame that dynamo skips
    but whose callees it compiles, as `_ParallelForward.__call__`)."""
    return torch._C._dynamo.eval_frame.get_eval_frame_callback() not in (None, False)


def _fingerprint(config: ParallelConfig) -> float:
    """A number that ranks with the same config share: what decides which collectives a step issues
    (the timeout and the size "auto" planned at may differ)."""
    fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    return float(zlib.crc32(repr([f for f in fields if f[0] not in ("timeout_s", "auto_size")]).encode()))


def _everywhere(runtime: Runtime, ok: bool) -> bool:
    """Whether `ok` holds on every rank (a collective: every rank must ask)."""
    flags = runtime.world.all_gather(torch.tensor([float(ok)], device=runtime.device)).wait()
    return bool(flags.min().item() > 0)


def use_cuda_graphs(config: ParallelConfig, runtime: Runtime, sharded: bool = False) -> bool:
    """Whether steps run as CUDA graphs: they need a CUDA device and capturable collectives, and weights
    that stay in place (not `sharded`).

    With several ranks, also NCCL's graph mixing (`NCCL_GRAPH_MIXING_SUPPORT`, on by default): between
    two replays a rank issues eager collectives on the same communicators (the step-0 agreement, an eager
    step's gathers), which NCCL supports only with mixing on. One graph holds collectives of two
    communicators under CFG split (the halves' exchange, the world's output gather); NCCL's hangs with
    mixing on were seen when one thread launches the graphs of several ranks, which never happens here
    (one rank per process), so mixing stays on and nothing is set for NCCL."""
    comms = [runtime.world, *runtime.patch_groups.values()]
    possible = runtime.device.type == "cuda" and all(getattr(c, "capturable", False) for c in comms)
    if sharded and possible:
        # FSDP2 gathers a block's weights in hooks that allocate and free them on the host's say: no graph
        # can capture that. A graphed step would also have to keep every block whole: nothing left to shard.
        if config.cuda_graphs:
            raise ValueError(
                "distrifusion: cuda_graphs=True cannot be combined with sharded weights: a CUDA graph cannot "
                "capture FSDP2's weight gathers; use cuda_graphs=None or False"
            )
        log.info("distrifusion: CUDA graphs are off while the weights are sharded (FSDP2's gathers cannot be captured)")
        return False
    if config.cuda_graphs and not possible:
        raise ValueError(
            "distrifusion: cuda_graphs=True needs a CUDA device and collectives that a graph can capture "
            f"(nccl, or one rank); this rank runs on {runtime.device} with "
            f"{', '.join(sorted({type(c).__name__ for c in comms}))}. Use cuda_graphs=None or False."
        )
    if possible and runtime.world_size > 1 and os.environ.get("NCCL_GRAPH_MIXING_SUPPORT", "1").strip() == "0":
        if config.cuda_graphs:
            raise ValueError(
                "distrifusion: cuda_graphs=True with several ranks needs NCCL's graph mixing (eager collectives "
                "run between replays on the same communicators), and NCCL_GRAPH_MIXING_SUPPORT=0 turns it off. "
                "Unset it, or use cuda_graphs=None or False."
            )
        if runtime.rank == 0:
            log.warning("distrifusion: NCCL_GRAPH_MIXING_SUPPORT=0: steps run eagerly (CUDA graphs need it on)")
        possible = False
    return possible if config.cuda_graphs is None else config.cuda_graphs


def remove(pipe_or_model) -> None:
    """Undo `parallelize`: restore the original forwards and attention processors (of the
    pipeline's VAE too)."""
    models = denoisers_of(pipe_or_model)
    vae = getattr(pipe_or_model, "vae", None) if models[0] is not pipe_or_model else None
    if isinstance(vae, nn.Module):
        _remove_model(vae)
    if models[0] is not pipe_or_model and hasattr(models[0], _STATE_ATTR):
        restore_text_encoders(pipe_or_model)
    if not [_remove_model(model) for model in models][0]:
        return
    base = getattr(type(pipe_or_model), "_distrifusion_base", None)
    if base is not None:
        pipe_or_model.__class__ = base
        pipe_or_model.__dict__.pop("_distrifusion_device", None)


def _remove_model(model: nn.Module) -> bool:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return False
    state.release()
    state.ownership.close()
    unbind_caches(model)
    if state.sharding is not None:
        state.sharding.gather_whole()  # collective: every rank removes alike

    _give_back_processors(model)  # first: the loop below deletes whatever else holds this state

    def ours(value) -> bool:  # the engine's layers and an adapter's own (a module's forward or another method)
        return isinstance(value, (_ParallelForward, _WithOriginalProcessors)) or getattr(value, "state", None) is state

    for module in model.modules():
        if ours(inner_forward(module)):
            set_inner_forward(module, None)
        for name, value in list(module.__dict__.items()):
            if ours(value):
                delattr(module, name)
    delattr(model, _STATE_ATTR)
    return True


def denoiser_of(pipe_or_model) -> nn.Module:
    """A pipeline's (first) denoising model (its `.unet` or `.transformer`), or `pipe_or_model` itself."""
    return denoisers_of(pipe_or_model)[0]


def denoisers_of(pipe_or_model) -> list[nn.Module]:
    """A pipeline's denoising models (`.unet`, `.transformer`, and Wan 2.2's second expert `.transformer_2`),
    or `[pipe_or_model]` itself."""
    return denoiser_modules(pipe_or_model)


def reset(pipe_or_model, *, drop_graphs: bool = False) -> None:
    """Start a new image: the next call is step 0 (synchronous) and no stale context remains.

    CUDA graphs are re-captured by themselves when weights were changed or replaced, when peft
    adapters were switched or rescaled (`set_adapters`, `disable_adapters`) and when the model
    changed (see `distrifusion.ownership`: LoRAs loaded, processors set, FreeU's factors); other
    changes that alter the computation without touching a weight or a module need `drop_graphs=True`.
    """
    for model in denoisers_of(pipe_or_model):
        _reset_model(model, drop_graphs)


def _reset_model(model: nn.Module, drop_graphs: bool) -> None:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("reset() needs a model or pipeline returned by distrifusion.parallelize()")
    _new_image(model, state, drop_graphs)


def _new_image(model: nn.Module, state: ParallelState, drop_graphs: bool = False) -> None:
    """`reset`'s work: by a pipeline call, by the user, or when the calls themselves show that a new image
    began (`ParallelState.begins_image`)."""
    state.reset()
    state.refresh_fused_kv()
    if state.graphs is not None:
        # Graphs read the weights' memory: replaced or modified weights need new graphs (and the fused
        # key/value projections a refresh, which the first eager step does). This rank's finding; the
        # graphs go on every rank at once, at the next call's step-0 agreement (`_ParallelForward.agree`).
        weights = tuple((p.data_ptr(), tensor_version(p)) for p in model.parameters()) + _adapter_settings(model)
        if weights != state.graph_weights or drop_graphs:
            state.graphs.stale = True
            state.graph_weights = weights


def _adapter_settings(model: nn.Module) -> tuple:
    """peft adapter layers' active adapters, scales and on/off switch: values a graph bakes in."""
    return tuple(
        (tuple(m.active_adapters), tuple(sorted(m.scaling.items())), m.disable_adapters)
        for m in model.modules()
        if isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "active_adapters")
    )


def _wrap_pipeline(pipe, runtime: Runtime) -> None:
    """Restart the step count at every pipeline call and show progress on rank 0 only."""
    cls = type(pipe)
    if cls not in _PIPELINE_CLASSES:

        def __call__(self, *args, **kwargs):
            _check_call(self, cls, args, kwargs)
            reset(self)
            out = cls.__call__(self, *args, **kwargs)
            # The last step's exchanges are still in flight: finish them now, not at the next image,
            # so that no collective outlives the image (a process may exit right after it).
            for model in denoisers_of(self):
                getattr(model, _STATE_ATTR).reset()
            return out

        def _execution_device(self):
            # The rank's device, even when a text encoder placed on the CPU is the pipeline's first module
            # (diffusers takes that one's device otherwise).
            return self._distrifusion_device

        members = {"__call__": __call__, "_distrifusion_base": cls, "_execution_device": property(_execution_device)}
        _PIPELINE_CLASSES[cls] = type(cls.__name__, (cls,), members)
    pipe._distrifusion_device = runtime.device
    pipe.__class__ = _PIPELINE_CLASSES[cls]
    if runtime.rank != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


_PIPELINE_CLASSES: dict[type, type] = {}


def _check_call(pipe, cls: type, args: tuple, kwargs: dict) -> None:
    """The adapters' refusals of a pipeline call (`ModelAdapter.check_pipeline_call`), before any work."""
    try:
        bound = inspect.signature(cls.__call__).bind(pipe, *args, **kwargs)
    except TypeError:
        return  # the pipeline's own call raises its own error
    bound.apply_defaults()
    for _, adapter in find_denoisers(pipe):
        adapter.check_pipeline_call(pipe, bound.arguments)


class _ParallelForward:
    """A model method (its forward; a VAE's encode or decode): split the inputs, run this rank's
    strip, gather the full output."""

    def __init__(self, model: nn.Module, state: ParallelState, adapter: ModelAdapter, method: str) -> None:
        self.model, self.state, self.adapter = model, state, adapter
        self.original = getattr(type(model), method)
        self.signature = inspect.signature(self.original)
        self.block = adapter.block_rows(model)
        self.noticed_no_split = False

    # torch.compile of the model (`torch.compile(model)` or `model.compile()`, before or after `parallelize`) meets this
    # wrapper as the model's forward. Dynamo skips this frame, not the frames it calls: it compiles the model's own
    # forward (`run_local`), in which every exchange (`ParallelState.context` and the like) is a graph break, while
    # the bookkeeping and collectives here run as plain Python (their methods are marked `torch.compiler.disable`).
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        if self.state.sharding is None:
            return self._call(*args, **kwargs)
        try:
            return self._call(*args, **kwargs)
        except BaseException:
            self.state.sharding.recover()  # no block left gathered, no gather left pending
            raise

    @torch.compiler.disable(recursive=False)
    def _call(self, *args, **kwargs):
        state, adapter = self.state, self.adapter
        if state.runtime.world_size == 1 and state.graphs is None:  # exactly the original model
            return self.original(self.model, *args, **kwargs)
        bound = self.signature.bind(self.model, *args, **kwargs)
        inputs = {k: v for k, v in bound.arguments.items() if k != "self"}
        if state.graphs is not None and _under_compile():
            raise RuntimeError(
                "distrifusion: a compiled model cannot also run as distrifusion's CUDA graphs; parallelize it with "
                "ParallelConfig(cuda_graphs=False) (torch.compile(..., mode='reduce-overhead') graphs it instead)"
            )
        timestep = adapter.timestep_arg
        if state.graphs is not None and isinstance(inputs.get(timestep), (int, float)):
            # A number would be baked into the graph: make it the tensor the model itself would make of it.
            inputs[timestep] = adapter.timestep_tensor(self.model, inputs[timestep])
        if state.runtime.world_size == 1:
            if state.step == 0:  # a step cache decides in Python at each call: no graph may replay one call's choice
                state.graphs.eager = stateful_caches(self.model)
            if state.graphs.stale:  # no other rank to agree with
                state.graphs.clear()
                state.graphs.stale = False
            full, kind = state.graphs("solo", self.run_local, inputs)
            return self.output(full, kind)
        if adapter.runs_whole(self.model, inputs):  # every rank computes the whole call, unsplit
            state.reset()
            state.partition = state.exchange = None
            return self.original(self.model, *args, **kwargs)
        inputs = self.split(inputs)
        if state.graphs is None:
            full, kind = self.run_split(inputs)
        else:
            phase = "sync" if state.sync_step else "displaced"
            full, kind = state.graphs((phase, state.partition, state.branch), self.run_split, inputs)
        state.step += 1
        return self.output(full, kind)

    @torch.compiler.disable
    def split(self, inputs: dict) -> dict:
        """Bring a changed model under the engine again, partition the call, begin its step (at the first,
        every rank agrees to go on) and return this rank's share of the inputs."""
        state, adapter = self.state, self.adapter
        problem = self.refresh()
        conditioning = {name: inputs.get(name) for name in adapter.conditioning_args}
        key, timestep = identity(conditioning), inputs.get(adapter.timestep_arg)
        state.enter_branch(key, conditioning, timestep)
        t = first_time(timestep)
        t = None if t is None else adapter.noise_level(t)
        if state.begins_image(t):  # whichever pipeline object calls: its own count starts again
            _new_image(self.model, state)
            state.enter_branch(key, conditioning, timestep)
        state.note_time(t)
        if state.step == 0 and problem is None:  # each image: hooks enabled since the last one
            problem = state.ownership.check_hooks()
        partition = self.partition(inputs)
        state.begin_step(partition)
        if state.step == 0:
            self.agree(adapter.sample_tensor(inputs), timestep, problem)
        elif problem is not None:
            raise problem
        return adapter.local_inputs(inputs, partition)

    def run_local(self, inputs: dict) -> tuple[torch.Tensor, type]:
        """The original forward on this rank's inputs: (output sample, output type)."""
        # By keyword wherever the signature allows: decorators such as diffusers' `apply_lora_scale`
        # look for their argument (the LoRA scale in joint_attention_kwargs) among the keywords only.
        args, kwargs = [self.model], {}
        for name, parameter in self.signature.parameters.items():
            if name == "self" or name not in inputs:
                continue
            if parameter.kind is parameter.POSITIONAL_ONLY:
                args.append(inputs[name])
            elif parameter.kind is parameter.VAR_POSITIONAL:
                args.extend(inputs[name])
            elif parameter.kind is parameter.VAR_KEYWORD:
                kwargs.update(inputs[name])
            else:
                kwargs[name] = inputs[name]
        out = self.original(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.adapter.output_tensor(out), None
        sample, kind = (out[0], tuple) if isinstance(out, tuple) else (out.sample, type(out))
        return self.adapter.output_tensor(sample), kind

    def run_split(self, inputs: dict) -> tuple[torch.Tensor, type]:
        """This rank's strip of one step and the gathered full output: the work a graph captures."""
        local, kind = self.run_local(inputs)
        self.state.end_step()
        full = self.gather(local, self.state.partition)
        if self.state.graphs is not None:
            self.state.exchange.settle()  # a graph must not leave collectives in flight
        return full, kind

    def output(self, full: torch.Tensor, kind: type | None):
        sample = self.adapter.output_sample(full)
        if kind is None:
            return sample
        return (sample,) if kind is tuple else kind(sample=sample)

    def partition(self, inputs: dict) -> Partition:
        """Validate the call's shape (identically on every rank, before any collective) and split it."""
        runtime, config, adapter = self.state.runtime, self.state.config, self.adapter
        batch, height, width = adapter.grid(inputs)
        world = runtime.world_size
        can_split = world % 2 == 0 and batch % 2 == 0
        if config.split_cfg == "force" and not can_split:
            raise ValueError(
                f"distrifusion: split_cfg='force' needs an even world size and an even batch; got world size "
                f"{world} and batch {batch}. Use split_cfg=True to fall back to one group."
            )
        cfg_groups = 2 if (config.split_cfg and can_split) else 1
        # An odd batch is no CFG batch (a model without CFG, a VAE): nothing to say about CFG halves.
        if config.split_cfg and not can_split and world > 1 and batch % 2 == 0 and not self.noticed_no_split:
            log.info(
                "distrifusion: batch %d over %d ranks cannot be split in CFG halves; using one group", batch, world
            )
            self.noticed_no_split = True
        patch_size = world // cfg_groups
        block, unit, axis = self.block, adapter.row_unit, adapter.split_axis
        if height % block:
            raise ValueError(
                f"distrifusion: {axis} of {height} {unit} must be a multiple of the model's block of {block} {unit}"
            )
        if height < patch_size * block:
            raise ValueError(
                f"distrifusion: {axis} of {height} {unit} is too small to split over {patch_size} ranks; the "
                f"minimum is {patch_size * block} {unit} ({block} per rank). Use a larger {axis.split()[-1]} or "
                "fewer ranks."
            )
        text, sharded, masked, extra = (), False, False, ()
        if adapter.joint_text:
            tokens = adapter.text_tokens(inputs)
            sharded = config.text_tokens == "sharded" and patch_size > 1
            text = split_rows(tokens, 1, patch_size) if sharded else (tokens,) * patch_size
            masked = adapter.text_masked(inputs)
            references = adapter.extra_tokens(inputs, height, width)
            if references:  # context like the text: sharded or replicated alike
                extra = split_rows(references, 1, patch_size) if sharded else (references,) * patch_size
        return Partition(
            batch,
            height,
            width,
            cfg_groups,
            runtime.cfg_index(cfg_groups) if cfg_groups == 2 else 0,
            runtime.rank % patch_size,
            split_rows(height, block, patch_size),
            text,
            sharded,
            block,
            masked,
            extra,
        )

    def refresh(self) -> Exception | None:
        """If the model changed since the last call, bring it under the engine again: its old
        exchange layout and graphs go, and this call starts a new image. Returns the refusal, if
        any, for `agree` to raise on every rank alike."""
        ownership = self.state.ownership
        if ownership.intact():
            return None
        if self.state.sharding is not None and ownership.changed:
            # New modules (a LoRA loaded, a layer replaced) inside sharded blocks: FSDP2 shards what it was
            # given at parallelize, and peft merges LoRAs into weights that are sharded between calls.
            return ValueError(
                "distrifusion: the model's modules changed after parallelize(shard_weights=True) (a LoRA loaded, "
                "a layer replaced); sharded weights cannot follow: load LoRAs before parallelize, or "
                "distrifusion.remove() and parallelize again"
            )
        self.state.release()
        if self.state.graphs is not None:
            self.state.graphs.stale = True  # dropped here; the step-0 agreement drops the other ranks' too
        try:
            ownership.install()
        except (TypeError, ValueError) as refusal:
            return refusal
        return None

    def agree(self, sample: torch.Tensor, timestep, problem: Exception | None) -> None:
        """Before an image's first collective of its layers, every rank learns whether each rank
        accepts the call: no refusal of a changed model, as many patch-parallel layers, the same
        inputs (e.g. latents drawn with a shared seed), steps as CUDA graphs on all or none. Then all
        raise, or none. And whether any rank's graphs went stale: then every rank drops its graphs, so
        that all capture (and launch their collectives captured or eager) alike, as NCCL requires."""
        graphs = self.state.graphs
        if sample.device.type == "meta":  # a shape-only run (bench counting traffic) has no values to compare
            if problem is not None:
                raise problem
            return
        t = torch.as_tensor(0 if timestep is None else timestep, device=sample.device).double().sum()
        layers = float(self.state.ownership.layers)
        graphed = [float(graphs is not None), float(graphs is not None and graphs.stale)]
        flags = torch.tensor(
            [float(problem is None), layers, _fingerprint(self.state.config), *graphed],
            dtype=torch.float64,
            device=sample.device,
        )
        summary = torch.cat([torch.stack([sample.double().sum(), sample.double().abs().sum(), t]), flags])
        gathered = self.state.runtime.world.all_gather(summary).wait()
        if problem is not None:
            raise problem
        refused = [rank for rank, ok in enumerate(gathered[:, 3].tolist()) if not ok]
        if refused:
            raise ValueError(f"distrifusion: rank(s) {refused} refused this call (their error says why)")
        counts = gathered[:, 4].long().tolist()
        if min(counts) != max(counts):
            raise ValueError(
                f"distrifusion: the ranks' models differ (patch-parallel layers per rank: {counts}); every rank "
                "must load the same LoRAs, adapters and attention processors"
            )
        if gathered[:, 5].amin() != gathered[:, 5].amax():
            raise ValueError(
                "distrifusion: the ranks run with different ParallelConfig settings (mode, compress, warm-up, ...); "
                "give every rank the same config"
            )
        if gathered[:, 6].amin() != gathered[:, 6].amax():
            raise ValueError(
                "distrifusion: some ranks run steps as CUDA graphs and others eagerly (cuda_graphs, the backend or "
                "NCCL_GRAPH_MIXING_SUPPORT differ); set them alike on every rank"
            )
        if graphs is not None and gathered[:, 7].amax() > 0:
            graphs.clear()
            graphs.stale = False
        sums = gathered[:, :3]
        if not ((sums == sums[0]) | (sums.isnan() & sums[0].isnan())).all():  # NaN inputs are alike too
            raise ValueError(
                "distrifusion: the model inputs differ between ranks; every rank must pass the same latent "
                "and timestep (use the same seed/generator on every rank)"
            )

    @torch.compiler.disable
    def gather(self, local: torch.Tensor, partition: Partition) -> torch.Tensor:
        """All-gather every rank's output strip into the full output on every rank.

        With reference tokens (`Partition.extra`) the output has their rows after the image's: each rank
        sends its strip's rows and its share of the reference rows, and the full output is every strip
        then every share (computed on this rank whether the reference tokens are sharded or replicated)."""
        dim, rank = self.adapter.output_dim, partition.patch_rank
        local = self.adapter.split_output(local, partition)  # in a layout whose `dim` stacks the strips
        references = partition.extra[rank] if partition.extra else 0
        strip = local.shape[dim] - references
        sizes, shares = self.state.sizes(strip), partition.reference_shares
        if references:
            first = strip + (0 if partition.sharded_text else sum(shares[:rank]))
            local = torch.cat([local.narrow(dim, 0, strip), local.narrow(dim, first, shares[rank])], dim)
        lengths = [n + m for n, m in zip(sizes, shares)]
        parts = self.state.runtime.world.all_gather(pad_to(local, dim, max(lengths))).wait()
        groups = [parts[g * partition.patch_size : (g + 1) * partition.patch_size] for g in range(partition.cfg_groups)]
        full = torch.cat(
            [
                torch.cat(
                    [part.narrow(dim, 0, n) for part, n in zip(group, sizes)]
                    + [part.narrow(dim, n, m) for part, n, m in zip(group, sizes, shares) if m],
                    dim,
                )
                for group in groups
            ],
            0,
        )
        return self.adapter.join_output(full, partition)
