"""diffusers features combined with a parallelised pipeline, in both orders (set up before or
after `parallelize`): FreeU, attention processors (sliced, fused QKV, the classic one, unknown
ones), LoRA on convolutions (peft, hot-swapped), IP-Adapter.

Each is exact in sync mode, or refused with a distrifusion error on every rank. References are
the same pipeline with the same feature in one process. The pipelines run in float64, so exact
patch parallelism differs from one process by float reduction order only (~1e-15 of the output
scale); the tolerance is 1e-9 of the scale, as in test_pipelines.py. FreeU is the exception:
diffusers computes its Fourier filter in float32 whatever the input, while the strips compute
it as an exact sum over rows in float64, so one process is itself only float32-accurate there;
its tolerance is the float32 criterion, 1e-5 of the scale (measured: ~1e-7).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import run_ranks
from peft import LoraConfig
from pipeline_helpers import SD_SIZE, run_text, tiny_sd

import distrifusion

TOL, FREEU_TOL = 1e-9, 1e-5
FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
LORA_TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]  # 3x3 convs: halo rows needed
IP_EMBED_DIM = 12

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- features


def add_conv_lora(pipe, name: str = "default", seed: int = 5) -> None:
    """A LoCon-style LoRA (ResNet 3x3 convs and attention projections), random non-zero weights."""
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name=name)
    pipe.unet.to(torch.float64)


def attention_lora(unet, seed: int = 8) -> dict:
    """A LoRA on the attention projections in the layout `load_lora_weights` reads (random weights)."""
    from peft import get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False), "donor")
    return {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(donor, adapter_name="donor").items()}


def fuse_and_unload_lora(pipe) -> None:
    """Merge a LoRA into the weights and drop its layers: peft writes the weights in place (`.data`)."""
    pipe.load_lora_weights(attention_lora(pipe.unet), adapter_name="merged")
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def lora_and_fused_qkv(pipe) -> None:
    """A LoRA on q/k/v and fused QKV projections: the fused processor computes from its own snapshot
    of the projections (the LoRA does not reach it), which the engine must follow."""
    pipe.load_lora_weights(attention_lora(pipe.unet), adapter_name="qkv")
    pipe.fuse_qkv_projections()


def ip_adapter_state_dict(unet, seed: int = 7) -> dict:
    """An IP-Adapter (4 image tokens) with random weights, in the layout diffusers' loader reads."""
    gen = torch.Generator().manual_seed(seed)
    cross, tokens = unet.config.cross_attention_dim, 4

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3

    image_proj = {
        "proj.weight": rand(cross * tokens, IP_EMBED_DIM),
        "proj.bias": rand(cross * tokens),
        "norm.weight": 1 + rand(cross),
        "norm.bias": rand(cross),
    }
    ip_layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        ip_layers[f"{key}.to_k_ip.weight"] = rand(hidden, cross)
        ip_layers[f"{key}.to_v_ip.weight"] = rand(hidden, cross)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def load_ip_adapter(pipe) -> None:
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    pipe.unet.to(torch.float64)


def run_ip(pipe, **kwargs):
    embeds = torch.randn(2, 1, IP_EMBED_DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return run_text(pipe, ip_adapter_image_embeds=[embeds], **kwargs)


SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler a": EulerAncestralDiscreteScheduler,  # draws noise at every step from the generator
    "dpm++ karras": partial(DPMSolverMultistepScheduler, use_karras_sigmas=True),
    "unipc": UniPCMultistepScheduler,
}


def with_scheduler(pipe, scheduler):
    """`scheduler` (a class, or a partial of one with extra options) made from the pipeline's config."""
    cls, options = (scheduler.func, scheduler.keywords) if isinstance(scheduler, partial) else (scheduler, {})
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    return pipe


def tiny_controlnet():
    """The tiny SD pipeline with a ControlNet made from its UNet (random conditioning embedding)."""
    sd = tiny_sd()
    torch.manual_seed(2)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8)).to(torch.float64)
    with torch.no_grad():  # from_unet zero-initialises the residual convs: make them matter
        for p in controlnet.parameters():
            if torch.all(p == 0):
                p.normal_(0, 0.1)
    pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


NARROW = 20
"""Pixels: 10 latent columns, not a whole number of the tiny UNet's 4-column blocks (the residual maps of
the lower levels round their width up)."""


def run_controlnet(pipe, width: int = SD_SIZE[1]):
    height = SD_SIZE[0]
    image = torch.linspace(0, 1, height * width * 3, dtype=torch.float64).reshape(1, 3, height, width)
    return run_text(pipe, image=image, width=width)


PROCESSORS = {
    "sliced": lambda pipe: pipe.enable_attention_slicing(1),
    "fused": lambda pipe: pipe.fuse_qkv_projections(),
    "classic": lambda pipe: pipe.unet.set_default_attn_processor(),
}


class UnknownProcessor(AttnProcessor2_0):
    """A processor the engine does not know (a subclass may compute anything, e.g. record maps)."""


# ----------------------------------------------------------------------------- parallel runs


def parallel(pipe, **config):
    return distrifusion.parallelize(pipe, distrifusion.ParallelConfig(**{"mode": "sync", "split_cfg": False, **config}))


def refused(fn) -> str:
    """The distrifusion error `fn` raises (the test checks it), or '' if it raised none."""
    try:
        fn()
    except (TypeError, ValueError) as error:
        return str(error)
    return ""


def rank_job() -> dict:
    import torch.distributed as dist

    out = {}
    pipe = tiny_sd()
    pipe.enable_freeu(**FREEU)
    parallel(pipe)
    out["freeu before"] = run_text(pipe)

    pipe = parallel(tiny_sd())
    out["plain"] = run_text(pipe)
    pipe.enable_freeu(**FREEU)
    out["freeu after"] = run_text(pipe)
    pipe.disable_freeu()

    pipe.enable_attention_slicing(1)
    out["sliced after"] = run_text(pipe)
    pipe.disable_attention_slicing()
    pipe.fuse_qkv_projections()
    out["fused after"] = run_text(pipe)
    pipe.unfuse_qkv_projections()
    pipe.unet.set_default_attn_processor()
    out["classic after"] = run_text(pipe)
    fresh = parallel(tiny_sd())  # diffusers' own check refuses processors it does not know: ours step aside
    fresh.unet.set_default_attn_processor()
    fresh.vae.set_default_attn_processor()
    out["classic right after"] = run_text(fresh)

    for name, set_up in PROCESSORS.items():  # the same processors set before parallelize
        before = tiny_sd()
        set_up(before)
        out[f"{name} before"] = run_text(parallel(before))

    # Unknown processors: on every rank, then on one rank only; both refused everywhere.
    pipe.unet.set_attn_processor(UnknownProcessor())
    out["unknown everywhere"] = refused(lambda: run_text(pipe))
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if dist.get_rank() == 1:
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(UnknownProcessor())
    out["unknown on rank 1"] = refused(lambda: run_text(pipe))
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    out["plain again"] = run_text(pipe)

    add_conv_lora(pipe)  # after parallelize: the LoRA's own 3x3 convs need halos
    out["lora after"] = run_text(pipe)
    add_conv_lora(pipe, "second", seed=6)  # hot swap: a second adapter, then switching
    pipe.unet.set_adapters(["second"])
    out["lora swapped"] = run_text(pipe)

    pipe = tiny_sd()
    add_conv_lora(pipe)
    out["lora before"] = run_text(parallel(pipe))

    pipe = parallel(tiny_sd())
    run_text(pipe)  # an image first: the engine has read the weights once
    fuse_and_unload_lora(pipe)
    out["lora fused and unloaded"] = run_text(pipe)
    pipe = tiny_sd()
    lora_and_fused_qkv(pipe)
    out["lora fused qkv before"] = run_text(parallel(pipe))
    pipe = parallel(tiny_sd())
    lora_and_fused_qkv(pipe)
    out["lora fused qkv after"] = run_text(pipe)

    pipe = tiny_sd()
    load_ip_adapter(pipe)
    out["ip before"] = run_ip(parallel(pipe))
    pipe = parallel(tiny_sd())
    load_ip_adapter(pipe)
    pipe.set_ip_adapter_scale(0.7)
    out["ip after"] = run_ip(pipe)
    mask = torch.ones(1, 1, *SD_SIZE, dtype=torch.float64)  # whole-image masks, resized per call: refused
    out["ip masks"] = refused(lambda: run_ip(pipe, cross_attention_kwargs={"ip_adapter_masks": [mask]}))

    for name, scheduler in SCHEDULERS.items():
        pipe = parallel(with_scheduler(tiny_sd(), scheduler))
        out[name] = run_text(pipe)
    out["two per prompt"] = run_text(parallel(tiny_sd()), num_images_per_prompt=2)
    out["controlnet"] = run_controlnet(parallel(tiny_controlnet()))
    out["controlnet narrow"] = run_controlnet(parallel(tiny_controlnet()), width=NARROW)

    # Displaced mode runs all of them (approximate: its warm-up covers one step of three).
    pipe = tiny_sd()
    pipe.enable_freeu(**FREEU)
    add_conv_lora(pipe)
    load_ip_adapter(pipe)
    out["all displaced"] = run_ip(parallel(pipe, mode="displaced", warmup_steps=1))
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(2, rank_job)


# ----------------------------------------------------------------------------- references


def reference(name: str):
    pipe = tiny_sd()
    if name in SCHEDULERS:
        return run_text(with_scheduler(pipe, SCHEDULERS[name]))
    if name == "two per prompt":
        return run_text(pipe, num_images_per_prompt=2)
    if name == "controlnet":
        return run_controlnet(tiny_controlnet())
    if name == "controlnet narrow":
        return run_controlnet(tiny_controlnet(), width=NARROW)
    if name == "lora fused and unloaded":
        run_text(pipe)
        fuse_and_unload_lora(pipe)
        return run_text(pipe)
    if name == "lora fused qkv":
        lora_and_fused_qkv(pipe)
        return run_text(pipe)
    if name == "freeu":
        pipe.enable_freeu(**FREEU)
    elif name == "lora":
        add_conv_lora(pipe)
    elif name == "lora swapped":
        add_conv_lora(pipe)
        add_conv_lora(pipe, "second", seed=6)
        pipe.unet.set_adapters(["second"])
    elif name in ("ip", "ip 0.7", "all"):
        if name == "all":
            pipe.enable_freeu(**FREEU)
            add_conv_lora(pipe)
        load_ip_adapter(pipe)
        if name == "ip 0.7":
            pipe.set_ip_adapter_scale(0.7)
        return run_ip(pipe)
    return run_text(pipe)


def check(results, key: str, ref, tol: float) -> None:
    for rank, result in enumerate(results):
        for what, value, expected in zip(("latents", "image"), result[key], ref):
            err = (value - expected).abs().max().item()
            scale = expected.abs().max().item()
            assert err <= tol * scale, f"rank {rank}, {key}, {what}: max error {err:.3g} (scale {scale:.3g})"


def differs(a, b) -> float:
    return ((a[0] - b[0]).abs().max() / b[0].abs().max()).item()


@pytest.mark.parametrize("order", ["before", "after"])
def test_freeu_is_exact(results, order):
    ref = reference("freeu")
    assert differs(ref, reference("plain")) > 1e-2, "FreeU must change the image for the test to mean anything"
    check(results, f"freeu {order}", ref, FREEU_TOL)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_processor_set_before_or_after_parallelize_is_exact(results, processor, order):
    check(results, f"{processor} {order}", reference("plain"), TOL)


@pytest.mark.parametrize("name", [*SCHEDULERS, "two per prompt", "controlnet"])
def test_schedulers_batches_and_controlnet_are_exact(results, name):
    expected = reference(name)
    if name == "controlnet":
        assert differs(expected, reference("plain")) > 1e-2, "the ControlNet must change the image"
    check(results, name, expected, TOL)


def test_set_default_attn_processor_right_after_parallelize_is_exact(results):
    check(results, "classic right after", reference("plain"), TOL)


@pytest.mark.parametrize("name", ["lora fused and unloaded", "lora fused qkv before", "lora fused qkv after"])
def test_lora_merged_in_place_or_under_fused_projections_is_exact(results, name):
    expected = reference(name.removesuffix(" before").removesuffix(" after"))
    assert differs(expected, reference("plain")) > 1e-2, "the LoRA must change the image"
    check(results, name, expected, TOL)


def test_controlnet_at_a_width_that_is_not_whole_blocks_is_exact(results):
    check(results, "controlnet narrow", reference("controlnet narrow"), TOL)


def test_ip_adapter_masks_are_refused(results):
    for result in results:
        assert "distrifusion" in result["ip masks"] and "ip_adapter_masks" in result["ip masks"]


def test_unknown_processor_is_refused_on_every_rank(results):
    for rank, result in enumerate(results):
        message = result["unknown everywhere"]
        assert "distrifusion" in message and "UnknownProcessor" in message, f"rank {rank}: {message!r}"
    assert "UnknownProcessor" in results[1]["unknown on rank 1"]
    assert "rank(s) [1] refused" in results[0]["unknown on rank 1"]
    check(results, "plain again", reference("plain"), TOL)  # and the pipeline works again afterwards


@pytest.mark.parametrize("order", ["before", "after"])
def test_conv_lora_is_exact(results, order):
    ref = reference("lora")
    assert differs(ref, reference("plain")) > 1e-2
    check(results, f"lora {order}", ref, TOL)


def test_lora_hot_swap_is_exact(results):
    check(results, "lora swapped", reference("lora swapped"), TOL)


@pytest.mark.parametrize("order,ref", [("before", "ip"), ("after", "ip 0.7")])
def test_ip_adapter_is_exact(results, order, ref):
    expected = reference(ref)
    assert differs(expected, reference("plain")) > 1e-2
    check(results, f"ip {order}", expected, TOL)


def test_displaced_mode_runs_every_feature(results):
    ref = reference("all")
    for result in results:
        latents, image = result["all displaced"]
        assert torch.isfinite(latents).all() and torch.isfinite(image).all()
        assert differs(result["all displaced"], ref) < 0.2  # approximate, but the same image
