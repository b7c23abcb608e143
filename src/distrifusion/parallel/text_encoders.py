"""Where a pipeline's text encoders live under `parallelize` (`ParallelConfig.text_encoders`).

Every rank encodes the same prompt, once per image: the encoders' weights are what they cost (a
Mistral Small 3.1 is 48 GB in bfloat16, more than most cards hold beside a sharded denoiser). Three
placements: "replicated" (whole on every rank's device), "sharded" (FSDP2 over the ranks, as the
denoiser: each rank keeps 1/N, the layers are gathered while the prompt is encoded; exact), "cpu" (kept
in host memory and run there; the embeddings go to the device). "auto" shards an encoder of more than
`AUTO_SHARD_BYTES` when the denoiser is sharded, and replicates it otherwise (measured: BENCHMARKS.md,
"Text encoders").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..engine.comm import Runtime, shard_group
from ..engine.config import ParallelConfig
from ..engine.shard import Sharding, check_shardable

log = logging.getLogger("distrifusion")

AUTO_SHARD_BYTES = 1e9
"""With text_encoders="auto" and a sharded denoiser, encoders larger than this are sharded too (T5-XXL,
UMT5-XXL, Mistral, Qwen2.5-VL); the CLIPs (0.25 and 1.4 GB in bfloat16 for CLIP-L and bigG, CLIP-L below
the line) stay whole: their gathers would cost more than they save."""

_SHARDING_ATTR = "_distrifusion_sharding"


def text_encoders(pipe) -> list[tuple[str, nn.Module]]:
    """The pipeline's text encoders: its components named text_encoder, text_encoder_2, ..."""
    components = getattr(pipe, "components", None) or {}
    return [(n, m) for n, m in components.items() if n.startswith("text_encoder") and isinstance(m, nn.Module)]


def placements(pipe, config: ParallelConfig, denoiser_sharded: bool, world_size: int) -> dict[str, str]:
    """Each text encoder's placement, "auto" made concrete; "sharded" on one rank is "replicated"."""
    chosen = {}
    for name, encoder in text_encoders(pipe):
        placement = config.text_encoders
        if placement == "auto":
            size = sum(p.numel() * p.element_size() for p in encoder.parameters())
            placement = "sharded" if denoiser_sharded and size > AUTO_SHARD_BYTES else "replicated"
        if placement == "sharded" and world_size == 1:
            placement = "replicated"
        chosen[name] = placement
    return chosen


def check_text_encoders(pipe, chosen: dict[str, str]) -> None:
    """Refuse, before any collective, an encoder whose weights cannot be sharded."""
    for name, encoder in text_encoders(pipe):
        if chosen.get(name) == "sharded":
            check_shardable(encoder, f"{name}'s")


def place_text_encoders(pipe, chosen: dict[str, str], config: ParallelConfig, runtime: Runtime) -> None:
    """Put each text encoder where `chosen` says (the pipeline's other modules are on the device already)."""
    for name, encoder in text_encoders(pipe):
        placement = chosen.get(name, "replicated")
        if placement == "replicated":
            encoder.to(runtime.device)
        elif placement == "sharded":
            group = shard_group(runtime, config.shard_group, config.timeout_s)
            setattr(encoder, _SHARDING_ATTR, Sharding(encoder, group, runtime.device))
        else:  # "cpu": run in host memory, hand the device the results
            encoder.to("cpu")
            encoder.forward = _OnCPU(encoder, runtime.device)
    if chosen and runtime.rank == 0:
        log.info("distrifusion: text encoders %s", ", ".join(f"{n} {p}" for n, p in chosen.items()))


def restore_text_encoders(pipe) -> None:
    """Undo `place_text_encoders`: sharded encoders gathered whole again (collective), CPU ones' forward
    given back (they stay in host memory, where they ran)."""
    for _, encoder in text_encoders(pipe):
        sharding = encoder.__dict__.pop(_SHARDING_ATTR, None)
        if sharding is not None:
            sharding.gather_whole()
        if isinstance(encoder.__dict__.get("forward"), _OnCPU):
            del encoder.forward


class _OnCPU:
    """A text encoder's forward run on the CPU: tensor inputs moved there, tensor outputs to `device`."""

    def __init__(self, encoder: nn.Module, device: torch.device) -> None:
        self.encoder, self.device = encoder, device

    def __call__(self, *args, **kwargs):
        cpu = torch.device("cpu")
        out = type(self.encoder).forward(self.encoder, *_moved(args, cpu), **_moved(kwargs, cpu))
        return _moved(out, self.device)


def _moved(value, device: torch.device):
    """`value` with every tensor in it (tuples, lists, dicts, transformers' ModelOutput) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):  # ModelOutput is a dict whose items are also its attributes
        for key in list(value.keys()):
            value[key] = _moved(value[key], device)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value
