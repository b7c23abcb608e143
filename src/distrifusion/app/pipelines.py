"""The embedded texture models, trained by this project (see training/) and shipped inside the package
so that the first command needs no download: a small class-conditional pixel-space UNet2DModel
(`TexturePipeline`), one with the Flux transformer architecture (`TextureDiTPipeline`), and a video model
with the Wan transformer architecture on moving textures (`TextureVideoPipeline`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DModel,
    WanTransformer3DModel,
)
from diffusers.utils import BaseOutput
from safetensors.torch import load_file

from ..measure.caching import cache_context, reset_cache

EMBEDDED = Path(__file__).parent.parent / "data" / "textures"
EMBEDDED_DIT = Path(__file__).parent.parent / "data" / "textures_dit"
EMBEDDED_VIDEO = Path(__file__).parent.parent / "data" / "textures_video"


def _output(image: torch.Tensor, output_type: str) -> ImagePipelineOutput:
    """Images in [-1, 1] (batch, RGB, height, width) as the pipelines return them: "pt" in [0, 1], "np"
    (batch, height, width, RGB) arrays, or "pil" images."""
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return ImagePipelineOutput(images=image)
    image = image.cpu().permute(0, 2, 3, 1).numpy()
    return ImagePipelineOutput(images=DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image)


class TexturePipeline(DiffusionPipeline):
    """Class-conditional sampling of textures of any size (a multiple of the UNet's block of 8 px)."""

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, classes: list[str] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.classes = classes or [str(i) for i in range(unet.config.num_class_embeds)]

    def class_index(self, name: str | int) -> int:
        """The label of a class given by name or index; unknown names raise a ValueError listing them."""
        if isinstance(name, int) or str(name).isdigit():
            index = int(name)
            if 0 <= index < len(self.classes):
                return index
        elif name in self.classes:
            return self.classes.index(name)
        raise ValueError(f"unknown class {name!r}; the embedded model knows: {', '.join(self.classes)}")

    @torch.no_grad()
    def __call__(
        self,
        classes: list[str | int] | str | int,
        height: int = 256,
        width: int = 256,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """Sample one image per entry of `classes`; `output_type` "pil", "np" or "pt" (in [0, 1])."""
        if not isinstance(classes, list):
            classes = [classes]
        labels = torch.tensor([self.class_index(c) for c in classes], device=self.device)
        shape = (len(labels), self.unet.config.in_channels, height, width)
        # Drawn on the generator's device (CPU by default) so that every rank and device agrees.
        image = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        reset_cache(self.unet)  # a step cache (diffusers' hooks) starts afresh with each image
        for t in self.progress_bar(self.scheduler.timesteps):
            with cache_context(self.unet, "cond"):
                noise = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(noise, t, image).prev_sample
        return _output(image, output_type)


def load_texture_pipeline(path: str | Path = EMBEDDED, torch_dtype: torch.dtype = torch.float32) -> TexturePipeline:
    """Load a texture model folder (unet/, scheduler/, classes.json), by default the embedded one."""
    path = Path(path)
    unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    classes = json.loads((path / "classes.json").read_text())["classes"]
    return TexturePipeline(unet, scheduler, classes)


class TextureDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling of textures with a pixel-space Flux transformer (rectified flow).

    The RGB image in [-1, 1] is packed 2x2 into tokens exactly as FluxPipeline packs latents, so any
    even height and width works. Each class is a learned sequence of tokens (`encoder_hidden_states`)
    plus a learned pooled vector (`pooled_projections`), given as `class_tokens` (classes, T, D) and
    `class_pooled` (classes, D); they follow the transformer's device and dtype at call time.
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: SchedulerMixin,
        class_tokens: torch.Tensor | None = None,
        class_pooled: torch.Tensor | None = None,
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        # Optional in the signature only: diffusers counts required arguments as pipeline modules.
        if class_tokens is None or class_pooled is None:
            raise ValueError("TextureDiTPipeline needs class_tokens and class_pooled (the class embeddings)")
        if class_tokens.ndim != 3 or class_pooled.ndim != 2 or len(class_tokens) != len(class_pooled):
            raise ValueError(
                f"class_tokens must be (classes, T, D) and class_pooled (classes, D), "
                f"got {tuple(class_tokens.shape)} and {tuple(class_pooled.shape)}"
            )
        self.class_tokens = class_tokens
        self.class_pooled = class_pooled
        self.classes = classes or [str(i) for i in range(len(class_tokens))]
        if len(self.classes) != len(class_tokens):
            raise ValueError(f"{len(self.classes)} class names for {len(class_tokens)} class embeddings")

    class_index = TexturePipeline.class_index

    @staticmethod
    def pack(images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline._pack_latents."""
        b, c, h, w = images.shape
        x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H/2 * W/2, 4C) -> (B, C, H, W), as FluxPipeline._unpack_latents."""
        b, _, channels = tokens.shape
        x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int) -> torch.Tensor:
        """`img_ids` (H/2 * W/2, 3) with columns (0, token_row, token_col), as FluxPipeline builds them."""
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        return ids.reshape(-1, 3)

    @torch.no_grad()
    def __call__(
        self,
        classes: list[str | int] | str | int,
        height: int = 128,
        width: int = 128,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """Sample one image per entry of `classes`; `output_type` "pil", "np" or "pt" (in [0, 1])."""
        if height < 2 or width < 2 or height % 2 or width % 2:
            raise ValueError(
                f"height and width must be positive multiples of 2 (the 2x2 token packing), got {height}x{width}; "
                f"use e.g. {max(2, height + height % 2)}x{max(2, width + width % 2)}"
            )
        if not isinstance(classes, list):
            classes = [classes]
        labels = torch.tensor([self.class_index(c) for c in classes])
        device, dtype = self.transformer.device, self.transformer.dtype
        encoder_hidden_states = self.class_tokens[labels].to(device=device, dtype=dtype)
        pooled_projections = self.class_pooled[labels].to(device=device, dtype=dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=device, dtype=dtype)
        img_ids = self.image_ids(height, width).to(device=device, dtype=dtype)
        channels = self.transformer.config.in_channels // 4
        # Drawn on the generator's device (CPU by default) so that every rank and device agrees.
        image = torch.randn((len(labels), channels, height, width), generator=generator, dtype=dtype)
        tokens = self.pack(image).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        reset_cache(self.transformer)  # a step cache (diffusers' hooks) starts afresh with each image
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t_batch = (t / 1000).expand(len(labels)).to(dtype)
            # Where the loop is, for diffusers' step caches (as FluxPipeline tells them).
            where = dict(
                step_index=i, num_inference_steps=num_inference_steps, sigma=float(self.scheduler.sigmas[i]), timestep=t
            )
            with self.transformer.cache_context("cond", **where):
                velocity = self.transformer(
                    hidden_states=tokens,
                    timestep=t_batch,
                    encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
            tokens = self.scheduler.step(velocity, t, tokens, return_dict=False)[0]
        return _output(self.unpack(tokens, height, width), output_type)


def load_texture_dit_pipeline(
    path: str | Path = EMBEDDED_DIT, torch_dtype: torch.dtype = torch.float32
) -> TextureDiTPipeline:
    """Load a texture DiT folder (transformer/, scheduler/, class_embeddings.safetensors, classes.json),
    by default the embedded one."""
    path = Path(path)
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    emb = load_file(path / "class_embeddings.safetensors")
    classes = json.loads((path / "classes.json").read_text())["classes"]
    return TextureDiTPipeline(transformer, scheduler, emb["tokens"], emb["pooled"], classes)


@dataclass
class TextureVideoPipelineOutput(BaseOutput):
    """Output of :class:`TextureVideoPipeline`.

    ``frames``: values in [0, 1]; numpy (batch, frames, height, width, 3) for ``output_type="np"``,
    a tensor (batch, frames, 3, height, width) for ``output_type="pt"`` (the layout of ``WanPipelineOutput``).
    """

    frames: np.ndarray | torch.Tensor


class TextureVideoPipeline(DiffusionPipeline):
    """Class-conditional sampling of moving textures with a pixel-space Wan transformer (rectified flow).

    The clip is RGB in [-1, 1] of shape (batch, 3, frames, height, width); the transformer patchifies it
    itself (patch (1, 2, 2)), so any frame count and any even height and width work. Each class is a
    learned sequence of tokens (``encoder_hidden_states``) given as ``class_tokens`` (classes, T, D);
    they follow the transformer's device and dtype at call time.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: SchedulerMixin,
        class_tokens: torch.Tensor | None = None,
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        # Optional in the signature only: diffusers counts required arguments as pipeline modules.
        if class_tokens is None:
            raise ValueError("TextureVideoPipeline needs class_tokens (the class embeddings)")
        if class_tokens.ndim != 3:
            raise ValueError(f"class_tokens must be (classes, T, D), got {tuple(class_tokens.shape)}")
        self.class_tokens = class_tokens
        self.classes = classes or [str(i) for i in range(len(class_tokens))]
        if len(self.classes) != len(class_tokens):
            raise ValueError(f"{len(self.classes)} class names for {len(class_tokens)} class embeddings")

    class_index = TexturePipeline.class_index

    @torch.no_grad()
    def __call__(
        self,
        classes: list[str | int] | str | int,
        num_frames: int = 17,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "np",
    ) -> TextureVideoPipelineOutput:
        """Sample one clip per entry of ``classes``; ``output_type`` "np" or "pt" (values in [0, 1])."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        if num_frames < 1 or num_frames % p_t:
            raise ValueError(f"num_frames must be a positive multiple of {p_t}, got {num_frames}")
        if height < p_h or width < p_w or height % p_h or width % p_w:
            raise ValueError(
                f"height and width must be positive multiples of the patch ({p_h}x{p_w}), got {height}x{width}"
            )
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        if not isinstance(classes, list):
            classes = [classes]
        labels = torch.tensor([self.class_index(c) for c in classes])
        device, dtype = self.transformer.device, self.transformer.dtype
        encoder_hidden_states = self.class_tokens[labels].to(device=device, dtype=dtype)
        shape = (len(labels), self.transformer.config.in_channels, num_frames, height, width)
        # Drawn on the generator's device (CPU by default), then moved, so that every rank and device agrees.
        noise_device = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=noise_device, dtype=dtype).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            velocity = self.transformer(
                hidden_states=latents.to(dtype),
                timestep=t.expand(latents.shape[0]),
                encoder_hidden_states=encoder_hidden_states,
                return_dict=False,
            )[0]
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        frames = (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
        if output_type == "pt":
            return TextureVideoPipelineOutput(frames=frames)
        return TextureVideoPipelineOutput(frames=frames.permute(0, 1, 3, 4, 2).cpu().numpy())


def load_texture_video_pipeline(
    path: str | Path = EMBEDDED_VIDEO, torch_dtype: torch.dtype = torch.float32
) -> TextureVideoPipeline:
    """Load a texture video folder (transformer/, scheduler/, class_embeddings.safetensors, classes.json),
    by default the embedded one (trained by training/train_texture_video.py)."""
    path = Path(path)
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    emb = load_file(path / "class_embeddings.safetensors")
    classes = json.loads((path / "classes.json").read_text())["classes"]
    return TextureVideoPipeline(transformer, scheduler, emb["tokens"], classes)


def load_pipeline(model: str, torch_dtype: torch.dtype = torch.float32):
    """The pipeline a command names: 'embedded' (the texture UNet), 'embedded-dit' (the texture Flux
    transformer), 'embedded-video' (the moving-texture Wan transformer), or a diffusers pipeline folder or
    hub id (`DiffusionPipeline.from_pretrained`)."""
    if model == "embedded-video":
        return load_texture_video_pipeline(torch_dtype=torch_dtype)
    if model == "embedded":
        return load_texture_pipeline(torch_dtype=torch_dtype)
    if model == "embedded-dit":
        return load_texture_dit_pipeline(torch_dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
