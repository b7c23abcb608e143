"""The embedded texture DiT (Flux transformer architecture): loads offline, samples any even size,
rejects bad input, and its samples carry each class's colour (which random weights cannot)."""

import pytest
import torch

from distrifusion.app.pipelines import TextureDiTPipeline, load_texture_dit_pipeline

CLASSES = ["brick", "grass", "gravel", "hubble_deep_field", "ihc", "retina"]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_texture_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_loads_offline_and_names_classes(pipe):
    assert isinstance(pipe, TextureDiTPipeline)
    assert pipe.classes == CLASSES
    assert pipe.class_index("ihc") == 4 and pipe.class_index(5) == 5
    assert tuple(pipe.class_tokens.shape) == (6, 4, pipe.transformer.config.joint_attention_dim)
    assert tuple(pipe.class_pooled.shape) == (6, pipe.transformer.config.pooled_projection_dim)
    config = pipe.transformer.config
    assert config.in_channels == 12 and config.patch_size == 1
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    n_bytes = sum(p.numel() * 4 for p in pipe.transformer.parameters())
    n_bytes += (pipe.class_tokens.numel() + pipe.class_pooled.numel()) * 4
    assert n_bytes <= 16 * 2**20


def test_sample_is_finite_in_range_with_the_right_shape(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe(["grass", 3], height=32, width=64, num_inference_steps=4, generator=gen, output_type="pt").images
    assert out.shape == (2, 3, 32, 64)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    pil = pipe("brick", height=32, width=32, num_inference_steps=2, generator=gen).images
    assert len(pil) == 1 and pil[0].size == (32, 32)


def test_bad_input_raises(pipe):
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("brick", height=33, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="brick, grass, gravel, hubble_deep_field, ihc, retina"):
        pipe("marble", height=32, width=32, num_inference_steps=1)


def test_samples_carry_their_class_colour(pipe):
    """Each class's 64x64 sample (8 steps) has its training images' colour signature, which random
    weights cannot give all six: brick, grass and gravel are grey photographs, the star field is
    dark, the stained tissue beige (red > green > blue), the retina red. Measured over seeds 0-5:
    grey |R-B|, |R-G| <= 0.011; star field brightness <= 0.11; tissue R-B 0.17-0.24, R-G >= 0.08;
    retina R-B >= 0.57 (training crop means: see classes.json "class_mean_rgb")."""
    gen = torch.Generator().manual_seed(0)
    images = pipe(CLASSES, height=64, width=64, num_inference_steps=8, generator=gen, output_type="pt").images
    mean = dict(zip(CLASSES, images.mean((2, 3))))
    for name in ("brick", "grass", "gravel"):
        r, g, b = mean[name].tolist()
        assert abs(r - b) < 0.04 and abs(r - g) < 0.04 and 0.3 < (r + g + b) / 3 < 0.65, (name, mean[name])
    assert mean["hubble_deep_field"].mean() < 0.2, mean["hubble_deep_field"]
    r, g, b = mean["ihc"].tolist()
    assert 0.1 < r - b < 0.35 and r - g > 0.04, mean["ihc"]
    r, g, b = mean["retina"].tolist()
    assert r - b > 0.4, mean["retina"]
