"""The embedded texture model: a small class-conditional pixel-space UNet2DModel trained by this
project (see training/), shipped inside the package so that the first command needs no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel

EMBEDDED = Path(__file__).parent / "data" / "textures"


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
        for t in self.progress_bar(self.scheduler.timesteps):
            noise = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(noise, t, image).prev_sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=image)
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(image) if output_type == "pil" else image)


def load_texture_pipeline(path: str | Path = EMBEDDED, torch_dtype: torch.dtype = torch.float32) -> TexturePipeline:
    """Load a texture model folder (unet/, scheduler/, classes.json), by default the embedded one."""
    path = Path(path)
    unet = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    classes = json.loads((path / "classes.json").read_text())["classes"]
    return TexturePipeline(unet, scheduler, classes)
