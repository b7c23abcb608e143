"""The one user-facing configuration object: a plain, validated dataclass with no side effects."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("displaced", "sync", "naive")
GROUPNORM_MODES = ("corrected_async", "stale", "sync", "separate")
TEXT_TOKEN_MODES = ("replicated", "sharded")
SHARD_GROUPS = ("world", "cfg_group")
TEXT_ENCODER_PLACEMENTS = ("auto", "replicated", "sharded", "cpu")
VIDEO_SPLITS = ("rows", "frames")
COMPRESS_MODES = ("int8", "fp8", "int4", "int2", "residual-int8", "residual-fp8", "residual-int4", "residual-int2")


@dataclass
class ParallelConfig:
    """How a diffusion model is spread over ranks.

    Constructing a config never touches devices or process groups; `parallelize` does that.
    """

    mode: str = "displaced"
    """"displaced" (DistriFusion: other strips' context from the previous step, exchanged
    asynchronously), "sync" (exact patch parallelism, fresh context every step, blocking),
    "naive" (strips never interact; the baseline that shows seams), or "auto": `parallelize`
    measures the link and each choice's share (`distrifusion.measure.planner`) and runs the most faithful of
    sync, displaced and displaced with each compression predicted within 10% of the fastest (its
    mode and compression replace these fields; the rest of this config is kept)."""

    auto_size: tuple[int, int] | None = None
    """mode="auto" only: the (height, width) in pixels to plan for; None: what the pipeline makes by default
    (its default sample size times its VAE's factor), for a bare model its config's sample size (Flux, which
    has none: 1024 x 1024, as FluxPipeline)."""

    warmup_steps: int = 4
    """Synchronous steps after the first one in "displaced" mode (the first step is always
    synchronous, because there is no previous step to borrow context from)."""

    groupnorm: str = "corrected_async"
    """GroupNorm statistics in displaced steps: "corrected_async" (previous global statistics
    corrected by the change of the local ones, as in the paper), "stale" (other strips'
    statistics from the previous step, own fresh), "sync" (blocking exchange every step: exact
    statistics, slower), or "separate" (local statistics only). No effect on diffusion
    transformers (Flux, SD3, PixArt), which normalise per token: setting it for one logs a warning."""

    text_tokens: str = "sharded"
    """Text tokens of models whose text and image tokens attend jointly (Flux.1/2, SD3, Qwen-Image):
    "sharded" (each rank computes a share of them and exchanges their keys/values like image tokens)
    or "replicated" (every rank computes all of them; nothing more to exchange). Reference-image
    tokens (Kontext, Qwen-Image-Edit, Flux.2 with an image) follow the same setting. Sharded is the
    default for speed: the largest share of 8 ranks of a Flux-like model at 1024² ran 1.6x
    faster (text tokens are not computed 8 times over), for about 12% more bytes (Flux-dev,
    N = 8, 1024²); on the embedded Flux-architecture model both are equally close to one process
    in displaced steps (QUALITY.md). Both are exact in synchronous steps. No effect on UNets,
    PixArt and SANA, whose text enters through cross-attention only, nor on Z-Image, whose caption
    tokens every rank computes (they attend jointly, after a caption-only refiner)."""

    video_split: str = "rows"
    """What a strip of a video is (video models: Wan): "rows", a band of whole token rows across all
    frames, or "frames", a run of whole latent frames. Both are exact in synchronous steps and exchange
    every token's keys/values (the same bytes for even strips; uneven strips pad to the largest). Rows
    is the default from measurement: on random-weight Wan models (N = 2/4/8, one warm-up step) both are
    equally close to one process (within 0.1 dB, README "Video"); rows then split 81 frames more evenly
    (480p: 30 token rows against 21 latent frames, so 8 ranks pad fewer bytes), allow more ranks, and a
    row seam stands still where a frame boundary is a moment in time. No effect on image models."""

    split_cfg: bool | str = True
    """Split the batch in two halves over two rank groups (with classifier-free guidance the
    halves are the unconditional and conditional branches). True: split when the world size and
    the batch are even, otherwise run one group and log a notice. "force": always split, and
    raise a ValueError when the world size or the batch is odd. False: never split."""

    split_vae: bool = True
    """Also split the pipeline's VAE (`AutoencoderKL`, the Wan video VAE `AutoencoderKLWan`) decode and
    encode in strips, always exactly (synchronous, whatever `mode` says): each rank decodes its strip,
    the image or video is gathered once. False leaves the VAE whole on every rank (as any other VAE is)."""

    compress: str | None = None
    """Displaced steps' exchange in fewer bytes (see `distrifusion.engine.compress`): None (as computed),
    "int8", "fp8", "int4" or "int2" (8, 4 or 2 bits per value, a scale per block of 256), or
    "residual-" + one of them (the change since what the others hold, in that code, with error
    feedback).
    Synchronous steps stay exact; small payloads (statistics) are never compressed."""

    comm_bucket_mb: float = 16.0
    """Displaced-step exchanges are coalesced into all-gathers of about this many megabytes, so
    that a UNet issues a few large collectives instead of hundreds of small ones."""

    cuda_graphs: bool | None = None
    """Replay each denoising step as a CUDA graph (one per image size and phase, captured at its
    second use), collectives included. None: on when the model runs on CUDA and the collectives
    can be captured (nccl, or a single rank); True: the same, but raise if they cannot; False:
    eager steps."""

    shard_weights: bool | str = False
    """Shard the denoiser's weights across the ranks (PyTorch's FSDP2, `fully_shard`, one unit per block):
    each rank keeps 1/N of them; a block's weights are gathered whole just before it runs (the next
    block's while it runs) and freed when it returns. For models larger than one device. False, True, or
    "auto": shard only when the model does not fit the device unsharded (the memory plan, `distrifusion
    plan --memory`, says why). Exact: a sharded model computes bit for bit what the unsharded one does.
    Costs: every step gathers the whole model once ((N-1)/N of its bytes received per rank), behind the
    blocks' computation; CUDA graphs are off (they cannot capture FSDP2's gathers: a notice is logged, and
    cuda_graphs=True is refused). No effect on one rank."""

    shard_group: str = "world"
    """Which ranks share one copy of the weights when sharding: "world" (all N: each keeps 1/N) or
    "cfg_group" (each CFG group of N/2 ranks keeps a whole copy among its members: 2/N each, gathers
    within the group, e.g. within one machine when each CFG group is a machine). See BENCHMARKS.md."""

    text_encoders: str = "auto"
    """Where a pipeline's text encoders live: "replicated" (whole on every rank's device, as the pipeline
    loaded them), "sharded" (FSDP2 over the ranks like the denoiser: 1/N each, the layers gathered during
    each prompt's encoding; exact), "cpu" (kept on the CPU of every rank and run there; the embeddings
    are moved to the device), or "auto": sharded when the denoiser is sharded and the encoder holds more
    than 1 GB of weights, else replicated (measured: BENCHMARKS.md, "Text encoders")."""

    timeout_s: float = 300.0
    """Timeout of every collective when `parallelize` creates the process group, so that a rank
    that dies cannot leave the others blocked forever."""

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, "auto"):
            raise ValueError(f"ParallelConfig.mode must be one of {(*MODES, 'auto')}, got {self.mode!r}")
        if self.auto_size is not None and not (
            isinstance(self.auto_size, (tuple, list))
            and len(self.auto_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.auto_size)
        ):
            raise ValueError(f"ParallelConfig.auto_size must be None or (height, width) pixels, got {self.auto_size!r}")
        if self.groupnorm not in GROUPNORM_MODES:
            raise ValueError(f"ParallelConfig.groupnorm must be one of {GROUPNORM_MODES}, got {self.groupnorm!r}")
        if self.text_tokens not in TEXT_TOKEN_MODES:
            raise ValueError(f"ParallelConfig.text_tokens must be one of {TEXT_TOKEN_MODES}, got {self.text_tokens!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(f"ParallelConfig.warmup_steps must be an int, got {self.warmup_steps!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"ParallelConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.video_split not in VIDEO_SPLITS:
            raise ValueError(f"ParallelConfig.video_split must be one of {VIDEO_SPLITS}, got {self.video_split!r}")
        if not (isinstance(self.split_cfg, bool) or self.split_cfg == "force"):
            raise ValueError(f"ParallelConfig.split_cfg must be True, False or 'force', got {self.split_cfg!r}")
        if not isinstance(self.split_vae, bool):
            raise ValueError(f"ParallelConfig.split_vae must be True or False, got {self.split_vae!r}")
        if not (self.cuda_graphs is None or isinstance(self.cuda_graphs, bool)):
            raise ValueError(f"ParallelConfig.cuda_graphs must be None, True or False, got {self.cuda_graphs!r}")
        if self.compress is not None and self.compress not in COMPRESS_MODES:
            raise ValueError(f"ParallelConfig.compress must be None or one of {COMPRESS_MODES}, got {self.compress!r}")
        if not (isinstance(self.shard_weights, bool) or self.shard_weights == "auto"):
            raise ValueError(f"ParallelConfig.shard_weights must be True, False or 'auto', got {self.shard_weights!r}")
        if self.shard_group not in SHARD_GROUPS:
            raise ValueError(f"ParallelConfig.shard_group must be one of {SHARD_GROUPS}, got {self.shard_group!r}")
        if self.text_encoders not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(
                f"ParallelConfig.text_encoders must be one of {TEXT_ENCODER_PLACEMENTS}, got {self.text_encoders!r}"
            )
        if self.shard_weights is True and self.cuda_graphs is True:
            raise ValueError(
                "ParallelConfig: cuda_graphs=True cannot be combined with shard_weights=True: a CUDA graph cannot "
                "capture FSDP2's weight gathers (host-side hooks that allocate and free the gathered weights); "
                "use cuda_graphs=None or False"
            )
        if not self.comm_bucket_mb > 0:
            raise ValueError(f"ParallelConfig.comm_bucket_mb must be > 0, got {self.comm_bucket_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s must be > 0, got {self.timeout_s}")

    def is_sync_step(self, step: int) -> bool:
        """Whether denoising step `step` (0-based, counted per image) exchanges fresh context."""
        if self.mode == "auto":
            raise ValueError("ParallelConfig(mode='auto') is made concrete by parallelize(); this config was not")
        return self.mode == "sync" or (self.mode == "displaced" and step <= self.warmup_steps)
