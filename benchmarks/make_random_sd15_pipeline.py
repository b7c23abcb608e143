"""Write a text-to-image pipeline folder at SD 1.5 architecture sizes, with random weights (no download).

    python benchmarks/make_random_sd15_pipeline.py /tmp/sd15_random
    distrifusion generate --model /tmp/sd15_random --height 512 --width 512 --steps 4 --guidance-scale 5 --nproc 2

The UNet and the VAE are the real SD 1.5 sizes (src/distrifusion/data/configs/sd15_unet.json and sd_vae.json);
the text encoder is a small CLIP (2 layers of width 768, the UNet's cross_attention_dim) and the tokenizer is
written in memory (distrifusion.measure.workload.byte_tokenizer): byte-level, no merges (every byte a token),
77 tokens long. The images are noise: this folder is for timing whole generations (text encoding, denoising,
VAE decoding), not for looking at them.
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from distrifusion.measure.workload import byte_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "distrifusion" / "data" / "configs"
TEXT_LEN = 77
TEXT_LAYERS = 2


def _config(name: str) -> dict:
    config = json.loads((CONFIGS / name).read_text())
    config.pop("_class_name", None)
    return config


def build(folder: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_config("sd15_unet.json"))
    vae = AutoencoderKL(**_config("sd_vae.json"))
    tokenizer = byte_tokenizer(TEXT_LEN)
    hidden = unet.config.cross_attention_dim
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=12,
            intermediate_size=4 * hidden,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where to write the pipeline (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    build(args.folder, args.seed)
    print(f"wrote {args.folder}")


if __name__ == "__main__":
    main()
