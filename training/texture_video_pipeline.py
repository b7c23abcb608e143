"""A minimal diffusers pipeline for the embedded texture *video* model (``train_texture_video.py``).

Kept outside the package for now so that the main team can move it into
``distrifusion.pipelines`` later; it depends on diffusers and safetensors only.

The transformer is called exactly as diffusers' ``WanPipeline`` calls it::

    self.transformer(
        hidden_states=latents.to(transformer_dtype),   # (batch, 3, frames, height, width)
        timestep=t.expand(batch),                      # float scheduler timestep in [0, 1000]
        encoder_hidden_states=prompt_embeds,           # (batch, tokens, text_dim)
        return_dict=False,
    )[0]

so that a later ``parallelize(pipe.transformer, ...)`` sees the same arguments as for a real Wan
model. There is no VAE (the model works on RGB pixels in [-1, 1]) and no text encoder (each class
is a learned token sequence) and no classifier-free guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SchedulerMixin, WanTransformer3DModel
from diffusers.utils import BaseOutput
from safetensors.torch import load_file


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

    def class_index(self, name: str | int) -> int:
        """The label of a class given by name or index; unknown names raise a ValueError listing them."""
        if isinstance(name, int) or str(name).isdigit():
            index = int(name)
            if 0 <= index < len(self.classes):
                return index
        elif name in self.classes:
            return self.classes.index(name)
        raise ValueError(f"unknown class {name!r}; the embedded video model knows: {', '.join(self.classes)}")

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


def load_texture_video_pipeline(path: str | Path, torch_dtype: torch.dtype = torch.float32) -> TextureVideoPipeline:
    """Load a texture video folder (transformer/, scheduler/, class_embeddings.safetensors, classes.json)."""
    path = Path(path)
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    emb = load_file(path / "class_embeddings.safetensors")
    classes = json.loads((path / "classes.json").read_text())["classes"]
    return TextureVideoPipeline(transformer, scheduler, emb["tokens"], classes)
