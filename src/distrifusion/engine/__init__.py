"""The engine's primitives, which know no model family: the config, the communicators and runtime
(`comm`), the codecs (`compress`), the exchange buffers (`exchange`), the per-model step state
(`state`), the patch-parallel layers (`layers`: halo conv, GroupNorm statistics, stale-K/V
attention, strip patch embedding, FreeU), CUDA graphs (`graphs`) and the rules among diffusers' model
hooks (`hooks`: layers beneath them, weights read directly or through the modules, data-dependent hooks
refused). Nothing here imports a layer above."""
