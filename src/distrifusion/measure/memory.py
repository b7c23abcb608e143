"""`distrifusion plan --memory`: what one rank holds, for a model, a size (and frames), a dtype and N
ranks, with the weights whole or sharded, counted on the meta device like the traffic: no weights, no
compute, any model at any size in seconds on any machine.

Counted per rank, in the pipeline's three phases (everything loaded stays resident in all of them):

- weights: the denoiser whole, or its share when sharded (`ParallelConfig.shard_weights`: 1/N of every
  unit, padded as FSDP2 pads, plus the few weights no unit holds), every expert of a mixture (Wan2.2's
  two), the VAE whole, the text encoders as placed (whole, 1/N, or none on the device: "cpu");
- denoising: the units gathered whole at once (FSDP2 in a forward: the running unit's parameters, its
  all-gather buffer, and the next unit's all-gather in flight: `_gathers`),
  this rank's activations at their peak (tensor storages alive, tracked by a dispatch mode; attention as
  a GPU's flash kernel allocates: its output, never the score matrix), the exchange buffers the engine
  keeps between steps (one set per guidance branch), the model's inputs;
- decoding: the VAE decode of this rank's strip (the engine splits an `AutoencoderKL`; other VAEs decode
  the whole image on every rank), at its peak;
- text encoding: the encoder's activations, and with a sharded encoder three of its largest units.

A family the engine has no adapter for is *estimated*:
the whole model on a strip-sized input (its activations), plus the keys/values every self- or joint
attention would keep for the other strips (the exchange) and one attention's worth gathered in flight.
The plan says which rows are counted and which estimated.

Beside the memory: the bytes one rank receives per step, for the weight gathers (each denoiser call
gathers every unit once) and for the exchange, and their time on PCIe 4/5 and NVLink at assumed rates
(`LINKS`, public figures, not measured here).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..engine.config import ParallelConfig
from ..engine.shard import shard_units
from ..models import find_denoiser
from ..parallel.parallelize import parallelize, remove
from .archs import CONFIGS, PIPELINES, TEXT_ENCODERS, Pipeline, arch_config_path
from .simulate import loopback_runtime
from .traffic import CountingCommunicator, attention_calls
from .workload import model_inputs

GB = 1e9
CARDS_GB = (24, 48, 80, 141)
"""Card sizes the plan compares with (GB): 24 (RTX 4090), 48 (L40S, RTX 6000 Ada), 80 (A100/H100), 141 (H200)."""
RESERVE_GB = 1.5
"""Memory a card loses before any tensor: the CUDA context, cuBLAS/cuDNN workspaces, NCCL's buffers."""
MARGIN = 0.05
"""The share of a card the caching allocator may lose to fragmentation."""
LINKS = (("PCIe 4.0 x16", 25e9), ("PCIe 5.0 x16", 50e9), ("NVLink 4 (H100 SXM)", 370e9))
"""Bytes per second one rank receives in an all-gather, assumed from public figures (PCIe: about 80% of
the x16 link's 32/64 GB/s; NVLink: NCCL's all-gather bus bandwidth on 8 H100 SXM), not measured here:
`distrifusion plan` measures the link itself."""


# -- counting bytes on the meta device ----------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it, while it is alive, and the peak. A
    storage that an operation only reads, views or writes in place was counted (or not) when made."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage._cdata not in known and storage._cdata not in self._alive:
                    nbytes = storage.nbytes()
                    self._alive[storage._cdata] = weakref.ref(storage, partial(self._freed, storage._cdata, nbytes))
                    self.add(nbytes)
        return out

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes

    def add(self, nbytes: int) -> None:
        """Count bytes by hand (a weight gather the meta run does not perform): negative frees them."""
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def flash_attention():
    """`F.scaled_dot_product_attention` allocating what a GPU's flash or memory-efficient kernel does: its
    output. On the meta device torch would take the math path, whose score matrix no GPU run allocates."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# -- models on the meta device ------------------------------------------------------------------------


def load_config(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def meta_model(config: dict, dtype: torch.dtype) -> nn.Module:
    """A model of a config dictionary on the meta device: a diffusers class by its `_class_name`, or a
    transformers one when `_config_class` names its configuration."""
    config = dict(config)
    name = config.pop("_class_name", "UNet2DConditionModel")
    extra = {k: config.pop(k) for k in list(config) if k.startswith("_")}
    with torch.device("meta"):
        if "_config_class" in extra:
            import transformers

            model = getattr(transformers, name)(getattr(transformers, extra["_config_class"])(**config))
        else:
            import diffusers

            model = getattr(diffusers, name).from_config(config)
    model = model.to(dtype).eval()
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype in (torch.float16, torch.bfloat16):  # as from_pretrained(torch_dtype=...) keeps them
        for module_name, module in model.named_modules():
            if any(k in module_name.split(".") for k in keep):
                module.float()
    return model


def twin(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device (same dtypes): a loaded model's shape, without its weights."""
    dtypes = {p.dtype for p in model.parameters()}
    with torch.device("meta"):
        if hasattr(model, "from_config") and hasattr(model, "config") and isinstance(model.config, dict):
            copy = type(model).from_config(model.config)
        else:  # transformers
            copy = type(model)(model.config)
    return copy.to(next(iter(dtypes)) if len(dtypes) == 1 else next(model.parameters()).dtype).eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _own_params(units: list[nn.Module]) -> dict[int, list[nn.Parameter]]:
    """Each unit's weights that no unit nested in it holds (what FSDP2 shards for that unit)."""
    ids = {id(u) for u in units}
    own: dict[int, list[nn.Parameter]] = {}
    for unit in units:
        found, stack = [], [unit]
        while stack:
            module = stack.pop()
            found.extend(module.parameters(recurse=False))
            stack.extend(c for c in module.children() if id(c) not in ids)
        own[id(unit)] = found
    return own


def _padded_share(p: nn.Parameter, parts: int) -> int:
    """Bytes of one rank's shard of a weight as FSDP2 keeps it (dim 0 cut in `parts`, padded to equal)."""
    if p.dim() == 0:
        return p.element_size()
    return math.ceil(p.shape[0] / parts) * (p.numel() // max(p.shape[0], 1)) * p.element_size()


def sharded_layout(model: nn.Module, parts: int) -> dict:
    """How `ParallelConfig.shard_weights` splits a model's weights over `parts` ranks (`engine.shard`): the
    units, each one's whole bytes, and the bytes one rank keeps (its shards and the weights no unit holds)."""
    units = [m for _, m in shard_units(model, parts)]
    own = _own_params(units)
    sharded = {id(p) for ps in own.values() for p in ps if p.dim() > 0}
    unit_bytes = {id(u): sum(p.numel() * p.element_size() for p in own[id(u)]) for u in units}
    kept = sum(
        _padded_share(p, parts) if id(p) in sharded else p.numel() * p.element_size() for p in model.parameters()
    )
    return dict(units=units, unit_bytes=unit_bytes, kept=kept, largest=max(unit_bytes.values(), default=0))


@contextlib.contextmanager
def _gathers(model: nn.Module, layout: dict, live: LiveBytes, order: list):
    """During one call, each unit's gathered weights counted as FSDP2 holds them in a forward (torch 2.13,
    `FSDPParamGroup.wait_for_unshard`): a unit's all-gather lands in a flat buffer of its whole size, is
    copied out into its whole parameters when it starts, and that buffer is freed only at the next unit's
    copy-out; the parameters are freed when it ends; as it starts it prefetches the next unit's all-gather
    (from the order of an earlier call). So while a unit computes: its parameters, its all-gather buffer and
    the next one's, three units. With no `order` yet, it records it (and gathers without prefetching)."""
    size = layout["unit_bytes"]
    following = {id(a): b for a, b in zip(order, order[1:])}
    whole: set[int] = set()  # units whose whole parameters are alive
    buffers: set[int] = set()  # units whose all-gather buffer is alive
    kept = None  # the unit whose buffer the next copy-out frees

    def all_gather(unit_id: int) -> None:
        if unit_id not in buffers and unit_id not in whole:
            buffers.add(unit_id)
            live.add(size[unit_id])

    def before(unit, *_):
        nonlocal kept
        if not following:
            order.append(unit)
        all_gather(id(unit))
        if kept is not None and kept != id(unit):
            buffers.discard(kept)
            live.add(-size[kept])
        whole.add(id(unit))
        live.add(size[id(unit)])  # copied out into the whole parameters
        kept = id(unit)
        if id(unit) in following:
            all_gather(id(following[id(unit)]))

    def after(unit, *_):
        if id(unit) in whole:
            whole.discard(id(unit))
            live.add(-size[id(unit)])

    hooks = [u.register_forward_pre_hook(partial(before, u)) for u in layout["units"]]
    hooks += [u.register_forward_hook(partial(after, u)) for u in layout["units"]]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for unit_id in [*whole, *buffers]:  # what this call left gathered
            live.add(-size[unit_id])


def _tensor_bytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


# -- inputs of the families the workload module does not know -------------------------------------------


def memory_inputs(model: nn.Module, height: int, width: int, frames: int | None = None, text: int = 512) -> dict:
    """One denoiser call's inputs at a pixel size (and frames), as the family's pipeline makes them, on the
    meta device, for the estimate of a family without an adapter (Flux.2, Qwen-Image and Wan were estimated
    here before their adapters); the others as `workload.model_inputs` makes them."""
    p = next(model.parameters())
    cfg = model.config
    kind = type(model).__name__

    def empty(*shape, dtype=p.dtype):
        return torch.empty(shape, dtype=dtype, device=p.device)

    if kind == "Flux2Transformer2DModel":  # VAE 8x, then 2x2 latent cells packed per token; one image
        tokens = (height // 16) * (width // 16)
        inputs = dict(
            hidden_states=empty(1, tokens, cfg.in_channels),
            encoder_hidden_states=empty(1, text, cfg.joint_attention_dim),
            timestep=empty(1),
            img_ids=empty(1, tokens, 4, dtype=torch.long),
            txt_ids=empty(1, text, 4, dtype=torch.long),
        )
        if cfg.get("guidance_embeds", True):
            inputs["guidance"] = empty(1)
        return inputs
    if kind == "QwenImageTransformer2DModel":  # packed 2x2 like Flux; guidance as a second call
        rows, cols = height // 16, width // 16
        return dict(
            hidden_states=empty(1, rows * cols, cfg.in_channels),
            encoder_hidden_states=empty(1, text, cfg.joint_attention_dim),
            timestep=empty(1),
            img_shapes=[(1, rows, cols)],
        )
    if kind == "WanTransformer3DModel":  # latents of (frames - 1) / 4 + 1 frames, 8x smaller; guidance as a second call
        latent_frames = ((frames or 1) - 1) // 4 + 1
        return dict(
            hidden_states=empty(1, cfg.in_channels, latent_frames, height // 8, width // 8),
            timestep=empty(1),
            encoder_hidden_states=empty(1, text, cfg.text_dim),
        )
    return model_inputs(model, height, width)


def _strip_rows(model: nn.Module, height: int, patch_ranks: int) -> int:
    """The pixel height of the largest strip of `patch_ranks` for a family the engine cannot split yet:
    whole token rows (16 px for packed 2x2 latents, 8 px x patch for Wan)."""
    unit = 16
    patch = getattr(model.config, "patch_size", None)
    if type(model).__name__ == "WanTransformer3DModel":
        unit = 8 * (patch[1] if isinstance(patch, (list, tuple)) else 2)
    rows = height // unit
    return math.ceil(rows / patch_ranks) * unit


# -- one rank's share ----------------------------------------------------------------------------------


def denoise_share(model: nn.Module, height: int, width: int, frames: int | None, ranks: int, mode: str, text: int,
                  layout: dict | None = None, inputs: dict | None = None) -> dict:  # fmt: skip
    """One rank's denoising memory on the meta device: peak activations (with the gathered units of
    `layout`, when sharded), the exchange kept between steps, the inputs, and the bytes received per step
    by the exchange. Counted through the engine when it has an adapter for the model (with the call's
    `inputs` on the meta device when given, else the family's at this size), else estimated."""
    try:
        find_denoiser(model)
        counted = True
    except TypeError:
        counted = False
    if counted:
        return _counted_share(model, height, width, ranks, mode, layout, inputs, frames)
    return _estimated_share(model, height, width, frames, ranks, text, layout)


def _counted_share(model, height, width, ranks, mode, layout, inputs=None, frames=None) -> dict:
    inputs = inputs if inputs is not None else model_inputs(model, height, width, frames=frames)
    meta = torch.device("meta")
    counter: dict = {}
    runtime = loopback_runtime(ranks, device=meta)
    if ranks > 1:
        runtime.world = CountingCommunicator(runtime.world, counter)
        runtime.patch_groups = {k: CountingCommunicator(c, counter) for k, c in runtime.patch_groups.items()}
    config = ParallelConfig(mode=mode, warmup_steps=0, cuda_graphs=False, split_vae=False)
    parallelize(model, config, runtime=runtime)
    order: list = []
    try:
        with torch.no_grad(), flash_attention(), LiveBytes() as live:
            with _gathers(model, layout, live, order) if layout else contextlib.nullcontext():
                model(**inputs)  # step 0: synchronous; lays the exchange out
            exchange = live.live  # what the engine keeps from one step to the next
            live.reset_peak()
            counter.clear()
            with _gathers(model, layout, live, order) if layout else contextlib.nullcontext():
                model(**inputs)
            activations = live.peak - exchange
    finally:
        remove(model)
    return dict(
        counted=True,
        activations=activations,
        exchange=exchange,
        inputs=_tensor_bytes(inputs),
        exchange_step_bytes=counter.get("bytes", 0),
    )


def _estimated_share(model, height, width, frames, ranks, text, layout) -> dict:
    full = memory_inputs(model, height, width, frames, text)
    with flash_attention():
        calls = attention_calls(model, full)
    element = next(model.parameters()).element_size()
    kv_all = [2 * batch * tokens * width_ * element for batch, tokens, width_ in calls]  # keys and values, all rows
    strip = memory_inputs(model, _strip_rows(model, height, ranks), width, frames, text) if ranks > 1 else full
    order: list = []
    with torch.no_grad(), flash_attention(), LiveBytes() as live:
        if layout:
            with _gathers(model, layout, live, order):
                model(**strip)  # records the order the units run in
            live.reset_peak()
        with _gathers(model, layout, live, order) if layout else contextlib.nullcontext():
            model(**strip)
        activations = live.peak
    if ranks > 1:  # the others' keys/values of one attention, gathered in flight beside this strip's
        activations += max(kv_all, default=0)
    return dict(
        counted=False,
        activations=activations,
        exchange=sum(kv_all) if ranks > 1 else 0,
        inputs=_tensor_bytes(full),
        exchange_step_bytes=sum(kv * (ranks - 1) // ranks for kv in kv_all),
    )


def decode_share(vae: nn.Module, height: int, width: int, frames: int | None, ranks: int) -> int:
    """Peak bytes of one rank's VAE decode (the engine's strip of an `AutoencoderKL`; else the whole)."""
    from diffusers import AutoencoderKL

    cfg = vae.config
    p = next(vae.parameters())
    channels = cfg.get("latent_channels") or cfg.get("z_dim")
    if type(vae).__name__ in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        shape = (1, channels, ((frames or 1) - 1) // 4 + 1, height // 8, width // 8)
    else:
        shape = (1, channels, height // 8, width // 8)
    z = torch.empty(shape, dtype=p.dtype, device=p.device)
    split = isinstance(vae, AutoencoderKL) and ranks > 1
    if split:
        parallelize(vae, ParallelConfig(mode="sync", cuda_graphs=False), runtime=loopback_runtime(ranks, device="meta"))
    try:
        with torch.no_grad(), flash_attention(), LiveBytes() as live:
            vae.decode(z)
            return live.peak
    finally:
        if split:
            remove(vae)


def encode_share(encoder: nn.Module, tokens: int) -> int:
    """Peak bytes of one text encoding of `tokens` tokens (all hidden states kept, as Flux.2's pipeline asks)."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    try:
        with torch.no_grad(), flash_attention(), LiveBytes() as live:
            encoder(input_ids=ids, output_hidden_states=True)
            return live.peak
    except Exception:  # noqa: BLE001 - a forward that needs values (image tokens): hidden states alone
        cfg = getattr(encoder.config, "text_config", encoder.config)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0)
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", 0)
        inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "d_ff", 0)
        element = next(encoder.parameters()).element_size()
        return tokens * element * ((layers + 1) * hidden + 3 * inner)


# -- the plan ------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """The meta-device models of one pipeline: denoiser, VAE, text encoders, and how it calls them."""

    name: str
    denoiser: nn.Module
    vae: nn.Module | None
    text_encoders: list[nn.Module]
    pipeline: Pipeline
    notes: list[str] = field(default_factory=list)


def pipeline_parts(arch: str, dtype: torch.dtype, text_encoders: list[str] | None = None, vae: str | None = None,
                   experts: int | None = None) -> Parts:  # fmt: skip
    """The meta models of an architecture (a name of `archs.ARCHS` or a denoiser's config PATH.json) and
    of the pipeline around it (`PIPELINES`, by name or by the denoiser's class), or the ones given."""
    config = load_config(arch_config_path(arch))
    kind = config.get("_class_name", "UNet2DConditionModel")
    pipeline = PIPELINES.get(arch) or PIPELINES.get(kind) or Pipeline(None)
    experts = experts or int(config.get("_experts", pipeline.experts))
    pipeline = Pipeline(**{**pipeline.__dict__, "experts": experts})
    denoiser = meta_model(config, dtype)
    notes = []
    vae_path = Path(vae) if vae else (CONFIGS / pipeline.vae if pipeline.vae else None)
    vae_model = meta_model(load_config(vae_path), dtype) if vae_path else None
    if vae_path is None:
        notes.append("no VAE known for this model: decode not counted (--vae PATH.json)")
    names = text_encoders if text_encoders is not None else [str(TEXT_ENCODERS / t) for t in pipeline.text_encoders]
    encoders = [meta_model(load_config(Path(t)), dtype) for t in names]
    if not names:
        notes.append("no text encoder known for this model: not counted (--text-encoder PATH.json)")
    return Parts(Path(arch).stem if arch.endswith(".json") else arch, denoiser, vae_model, encoders, pipeline, notes)


def memory_plan(parts: Parts, height: int, width: int, frames: int | None, ranks_list: list[int],
                mode: str = "displaced", cards_gb=CARDS_GB) -> dict:  # fmt: skip
    """Per-rank memory of `parts` at each N of `ranks_list`, unsharded and sharded, with each text-encoder
    placement; which fit on each card; the bytes per step of the weight gathers and of the exchange."""
    pipeline, denoiser = parts.pipeline, parts.denoiser
    text = pipeline.text_tokens
    whole = weight_bytes(denoiser)
    vae_weights = weight_bytes(parts.vae) if parts.vae is not None else 0
    encoders = [(weight_bytes(e), encode_share(e, text)) for e in parts.text_encoders]
    encoder_layouts = {}
    rows = []
    for ranks in ranks_list:
        decode = decode_share(parts.vae, height, width, frames, ranks) if parts.vae is not None else 0
        whole_share = None
        for sharded in (False, True) if ranks > 1 else (False,):
            layout = sharded_layout(denoiser, ranks) if sharded else None
            share = denoise_share(denoiser, height, width, frames, ranks, mode, text, layout)
            whole_share = whole_share or share
            # The sharded run's peak holds the gathered units too: what it adds to the unsharded activations.
            gathered = share["activations"] - whole_share["activations"] if sharded else 0
            branches = pipeline.calls_per_step
            kept = layout["kept"] if sharded else whole
            denoiser_weights = kept * pipeline.experts
            exchange = share["exchange"] * branches
            denoise = share["activations"] + share["inputs"]
            gather_step = 0
            if sharded:
                gather_step = sum(layout["unit_bytes"].values()) * (ranks - 1) // ranks * pipeline.calls_per_step
            placements = ("replicated", "sharded", "cpu") if ranks > 1 else ("replicated", "cpu")
            for placement in placements if parts.text_encoders else ("replicated",):
                te_resident, te_phase = 0, 0
                for index, (te_whole, te_act) in enumerate(encoders):
                    if placement == "replicated":
                        te_resident += te_whole
                        te_phase = max(te_phase, te_act)
                    elif placement == "sharded":
                        if (index, ranks) not in encoder_layouts:
                            encoder_layouts[index, ranks] = sharded_layout(parts.text_encoders[index], ranks)
                        te_layout = encoder_layouts[index, ranks]
                        te_resident += te_layout["kept"]
                        te_phase = max(te_phase, te_act + 3 * te_layout["largest"])  # as _gathers counts
                resident = denoiser_weights + vae_weights + te_resident + exchange
                peak = resident + max(denoise, decode, te_phase)
                rows.append(
                    dict(
                        ranks=ranks,
                        sharded=sharded,
                        text_encoders=placement,
                        counted=share["counted"],
                        weights=denoiser_weights,
                        largest_unit=layout["largest"] if sharded else 0,
                        gathered=gathered,
                        activations=whole_share["activations"],
                        exchange=exchange,
                        inputs=share["inputs"],
                        vae_weights=vae_weights,
                        decode=decode,
                        text_encoder_weights=te_resident,
                        text_encoding=te_phase,
                        peak=peak,
                        fits={gb: fits(peak, gb) for gb in cards_gb},
                        gather_step_bytes=gather_step,
                        exchange_step_bytes=share["exchange_step_bytes"] * branches,
                    )
                )
    return dict(
        arch=parts.name,
        height=height,
        width=width,
        frames=frames,
        dtype=str(next(denoiser.parameters()).dtype).removeprefix("torch."),
        mode=mode,
        denoiser_bytes=whole,
        experts=pipeline.experts,
        calls_per_step=pipeline.calls_per_step,
        text_encoder_bytes=[e[0] for e in encoders],
        vae_bytes=vae_weights,
        notes=parts.notes,
        rows=rows,
    )


def fits(peak: int, card_gb: float) -> bool:
    """Whether `peak` bytes of tensors fit a card of `card_gb` GB, its reserve and margin kept."""
    return fits_capacity(peak, card_gb * GB)


def smallest_fit(found: dict, card_gb: float) -> dict | None:
    """The first row that fits `card_gb` in the order a user would try: fewest ranks, then unsharded before
    sharded, then text encoders replicated, sharded, on the CPU."""
    order = {"replicated": 0, "sharded": 1, "cpu": 2}
    rows = sorted(found["rows"], key=lambda r: (r["ranks"], r["sharded"], order[r["text_encoders"]]))
    return next((r for r in rows if r["fits"][card_gb]), None)


def format_memory_plan(found: dict) -> str:
    """The plan as text: one line per (N, sharding, text-encoder placement), then what fits each card."""
    gb = lambda b: f"{b / GB:7.1f}"  # noqa: E731
    head = (
        f"memory plan: {found['arch']} {found['height']}x{found['width']}"
        + (f", {found['frames']} frames" if found["frames"] else "")
        + f", {found['dtype']}, {found['mode']}; denoiser {found['denoiser_bytes'] / GB:.1f} GB"
        + (f" x {found['experts']} experts" if found["experts"] > 1 else "")
        + f", VAE {found['vae_bytes'] / GB:.2f} GB, text encoders "
        + (" + ".join(f"{b / GB:.1f}" for b in found["text_encoder_bytes"]) or "none")
        + " GB"
        + (f"; {found['calls_per_step']} denoiser calls per step" if found["calls_per_step"] > 1 else "")
    )
    lines = [head, *[f"note: {n}" for n in found["notes"]]]
    estimated = [r for r in found["rows"] if not r["counted"]]
    if estimated:
        lines.append(
            "note: this family has no adapter in this version: activations and exchange are estimated (the whole "
            "model on a strip-sized input, plus the keys/values of the other strips)"
        )
    cards = list(found["rows"][0]["fits"])
    lines.append(
        f"{'N':>3} {'shard':>5} {'text enc.':>10} | {'weights':>7} {'gather':>7} {'activ.':>7} {'exch.':>7} "
        f"{'decode':>7} {'text':>7} | {'peak GB':>7} | fits " + " ".join(f"{c:>4}" for c in cards)
    )
    for r in found["rows"]:
        lines.append(
            f"{r['ranks']:>3} {'yes' if r['sharded'] else 'no':>5} {r['text_encoders']:>10} | {gb(r['weights'])} "
            f"{gb(r['gathered'])} {gb(r['activations'])} {gb(r['exchange'])} {gb(r['decode'])} "
            f"{gb(r['text_encoder_weights'])} | {gb(r['peak'])} |      "
            + " ".join(f"{'yes' if r['fits'][c] else '-':>4}" for c in cards)
        )
    lines.append(
        "weights: the denoiser's (its share when sharded); gather: its units gathered whole at the peak (the "
        "running one, its all-gather buffer and the next one's, as FSDP2 holds them); "
        "text: the text encoders' weights on the device; peak = weights + VAE + text + exchange + the largest "
        f"phase (denoising, decoding, encoding); fits: peak + {RESERVE_GB} GB reserve within {1 - MARGIN:.0%} "
        "of the card"
    )
    for card in cards:
        per_n = []
        for n in sorted({r["ranks"] for r in found["rows"]}):
            best = smallest_fit({"rows": [r for r in found["rows"] if r["ranks"] == n]}, card)
            per_n.append(f"N={n}: " + (_setting(best) if best else "-"))
        line = f"{card:g} GB: " + "; ".join(per_n)
        if smallest_fit(found, card) is None:
            least = min(found["rows"], key=lambda r: r["peak"])
            largest = max(r["ranks"] for r in found["rows"])
            parts = {k: least[k] for k in ("weights", "exchange", "activations", "decode", "text_encoder_weights")}
            biggest = max(parts, key=parts.get)
            line += (
                f". Does not fit on {largest} x {card:g} GB: the least a rank needs is {least['peak'] / GB:.1f} GB "
                f"({_setting(least)}) + {RESERVE_GB} GB reserve; its largest part: {biggest.replace('_', ' ')} "
                f"{parts[biggest] / GB:.1f} GB"
            )
        lines.append(line)
    lines.append("per step, received per rank (weight gathers | exchange), and their time on " + ", ".join(
        f"{name} ({rate / 1e9:.0f} GB/s)" for name, rate in LINKS))  # fmt: skip
    seen = set()
    for r in found["rows"]:
        if r["ranks"] == 1 or (r["ranks"], r["sharded"]) in seen:
            continue
        seen.add((r["ranks"], r["sharded"]))
        times = " ".join(
            f"{(r['gather_step_bytes'] / rate) * 1e3:8.0f} | {(r['exchange_step_bytes'] / rate) * 1e3:6.0f} ms"
            for _, rate in LINKS
        )
        lines.append(
            f"{r['ranks']:>3} {'sharded' if r['sharded'] else 'whole':>7}: {r['gather_step_bytes'] / GB:6.2f} | "
            f"{r['exchange_step_bytes'] / GB:6.2f} GB;  {times}"
        )
    return "\n".join(lines)


def _setting(row: dict) -> str:
    weights = "sharded" if row["sharded"] else "whole"
    return f"{weights}, text encoders {row['text_encoders']}, {row['peak'] / GB:.1f} GB"


def local_capacity(device: torch.device) -> int:
    """Bytes one rank may use on its device: the card's memory; on a CPU, the machine's available memory
    shared by the ranks on this machine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        info = Path("/proc/meminfo").read_text().splitlines()
        available = int(next(line for line in info if line.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return 1 << 62
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return available // max(local, 1)


def fits_capacity(peak: float, capacity: float) -> bool:
    """Whether `peak` bytes of tensors fit a device of `capacity` bytes, its reserve and margin kept."""
    return peak + RESERVE_GB * GB <= capacity * (1 - MARGIN)


def live_parts(pipe_or_model, model: nn.Module, size: tuple[int, int]) -> Parts:
    """The meta twins of a loaded pipeline's denoiser, VAE and text encoders (their shapes and dtypes, no
    weights), with what `PIPELINES` knows of its family (calls per step, text length; else `size`)."""
    kind = type(model).__name__
    known = PIPELINES.get(kind) or Pipeline(None, size=size)
    components = getattr(pipe_or_model, "components", None) or {}
    experts = sum(1 for m in components.values() if isinstance(m, type(model))) or 1
    pipeline = Pipeline(**{**known.__dict__, "experts": experts})
    vae = components.get("vae")
    encoders = [twin(m) for n, m in components.items() if n.startswith("text_encoder") and isinstance(m, nn.Module)]
    return Parts(kind, twin(model), twin(vae) if isinstance(vae, nn.Module) else None, encoders, pipeline)


def measure_share_memory(arch: str, height: int, width: int, dtype: torch.dtype, ranks_list: list[int],
                         device: torch.device, mode: str = "displaced",
                         model: nn.Module | None = None) -> list[dict]:  # fmt: skip
    """`bench --memory`: the denoiser's peak memory on this device, measured, beside the plan's count for the
    same thing (its weights, one rank's share of a step of N ranks with loopback collectives: activations,
    exchange, inputs), for each N. On CUDA the allocator's peak; on a CPU this process's resident peak
    (freed memory handed back at once, `timing.return_freed_memory`) above what it held before the model.
    `model`: `arch` already built on `device` in `dtype` (the device check's), else it is built here."""
    from .timing import current_memory_mb, free_cached_memory, peak_memory_mb, reset_peak_memory, return_freed_memory
    from .workload import build_model

    return_freed_memory()
    model = model if model is not None else build_model(arch, dtype, device)
    with torch.no_grad():  # a small call first: the libraries' own first-use allocations are not the model's
        model(**model_inputs(model, 64, 64))
    meta = meta_model(load_config(arch_config_path(arch)), dtype)
    rows = []
    for ranks in ranks_list:
        share = denoise_share(meta, height, width, None, ranks, mode, 77)
        planned = share["activations"] + share["exchange"] + share["inputs"]
        inputs = model_inputs(model, height, width)
        config = ParallelConfig(mode=mode, warmup_steps=0, cuda_graphs=False)
        parallelize(model, config, runtime=loopback_runtime(ranks, device=device))
        try:
            free_cached_memory(device)
            before = current_memory_mb(device) * 2**20 - _tensor_bytes(inputs)  # the weights, and what torch holds
            reset_peak_memory(device)
            with torch.no_grad():
                model(**inputs)
                model(**inputs)
            measured = peak_memory_mb(device) * 2**20 - before
        finally:
            remove(model)
        del inputs
        weights = weight_bytes(model)
        rows.append(
            dict(
                arch=arch,
                height=height,
                width=width,
                dtype=str(dtype).removeprefix("torch."),
                ranks=ranks,
                device=str(device),
                weights=weights,
                step_planned=planned,
                step_measured=measured,
                predicted=weights + planned,
                measured=weights + measured,
                error=(planned - measured) / (weights + measured),
                counted=share["counted"],
            )  # fmt: skip
        )
    return rows
