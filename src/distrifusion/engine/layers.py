"""The patch-parallel layers: conv halos, GroupNorm statistics and self-attention context.

Each is a small callable installed on one module of an ordinary model (as the module's
`forward`, or as an attention processor) and removed by deleting it again. Each asks the
model's `ParallelState` for the split and for the other strips' context; none of them keeps
state of its own beyond weights it derives from its module.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0, FusedJointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb, get_2d_sincos_pos_embed
from torch import nn

from .exchange import normal_tensors, tensor_version
from .shard import is_sharded_parameter
from .state import ParallelState


def pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `t` along `dim` to `size`: all-gathers need equally shaped payloads."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)


def refuse_packed_weights(module: nn.Module, what: str, why: str) -> None:
    """A layer that computes with its module's weights itself (beneath the module's hooks, which have cast or
    onloaded them by then) needs ordinary tensors: refuse a quantised tensor subclass by name."""
    # Meta parameters are plain here: traffic counting and memory plans build these layers on the meta device.
    # The engine's own FSDP2 shards are whole, plain tensors whenever the layer runs (inside its unit).
    params = [p for p in module._parameters.values() if p is not None and not is_sharded_parameter(p)]
    kinds = sorted({type(p).__name__ for p in params if type(p) is not nn.Parameter})
    if kinds:
        raise TypeError(
            f"distrifusion: {what} holds {', '.join(kinds)} weights (quantised?), and {why}: not supported; "
            "leave such layers unquantised (e.g. quantise linear layers only)"
        )


class PatchConv2d:
    """A convolution over one strip of rows, with halo rows taken from the neighbouring strips: a
    Conv2d over (rows, columns), or a Conv3d over (frames, rows, columns); rows are the input's
    second-to-last axis either way, and the other axes stay whole on every rank.

    Output row `o` of a conv reads input rows `o*stride - pad + i*dilation`; for a strip whose
    first row is a multiple of the stride, that needs `pad` rows above it and
    `(k-1)*dilation + 1 - stride - pad` rows below it. Image edges get zeros, as the conv's own
    zero padding would give them.

    `padding` is the conv's zero padding per spatial axis for a conv that pads in its own forward
    instead of through `conv.padding` (default: `conv.padding`); `halo_conv` convolves an input
    that such a forward has prepared (e.g. padded in time) with this padding.
    """

    def __init__(
        self, conv: nn.Conv2d | nn.Conv3d, name: str, state: ParallelState, padding: tuple[int, ...] | None = None
    ) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(
                f"distrifusion: conv {name!r} uses padding {conv.padding!r}/{conv.padding_mode!r}; "
                "only numeric zero padding can be split into strips"
            )
        self.padding = tuple(conv.padding if padding is None else padding)
        kernel, stride, pad, dilation = conv.kernel_size[-2], conv.stride[-2], self.padding[-2], conv.dilation[-2]
        self.above = pad
        self.below = (kernel - 1) * dilation + 1 - stride - pad
        if self.below < 0:
            raise TypeError(
                f"distrifusion: conv {name!r} (kernel {kernel}, stride {stride}, padding {pad}) "
                "does not map strips to strips"
            )
        refuse_packed_weights(conv, f"conv {name!r}", "its halo rows are convolved with its weight")
        self.conv, self.name, self.state = conv, name, state
        self.conv_fn = _conv3d if conv.weight.dim() == 5 else F.conv2d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, conv = self.state, self.conv
        if not state.split or state.naive:
            return type(conv).forward(conv, x)  # zero padding at strip edges is exactly "naive"
        return self.halo_conv(x)

    def halo_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The conv of this rank's strip `x`, its edge rows computed from the neighbours' halo rows."""
        state, conv = self.state, self.conv
        rank, n = state.partition.patch_rank, state.partition.patch_size
        dim = x.dim() - 2
        rows = x.shape[dim]
        if rows < max(self.above, self.below):
            raise ValueError(
                f"distrifusion: a strip of {rows} rows is thinner than the halo of conv "
                f"{self.name!r}; use fewer ranks or a larger height"
            )
        # Rows this strip lends: its top rows to the strip above, its bottom rows to the one below.
        edges = torch.cat([x.narrow(dim, 0, self.below), x.narrow(dim, rows - self.above, self.above)], dim)
        others = state.context(self.name, edges)
        top = others[rank - 1].narrow(dim, self.below, self.above) if rank > 0 else _zero_rows(x, dim, self.above)
        bottom = others[rank + 1].narrow(dim, 0, self.below) if rank < n - 1 else _zero_rows(x, dim, self.below)
        conv_fn = partial(self.conv_fn, weight=conv.weight, bias=conv.bias, stride=conv.stride, groups=conv.groups)
        conv_fn = partial(conv_fn, dilation=conv.dilation)
        no_row_padding = (*self.padding[:-2], 0, self.padding[-1])
        span = (conv.kernel_size[-2] - 1) * conv.dilation[-2]
        if conv.stride[-2] == 1 and self.above == self.below and rows >= span:
            # Without copying the strip: convolve it with the conv's own zero padding, then redo the
            # few edge rows that must see the neighbours' halo rows instead of zeros.
            out = conv_fn(x, padding=self.padding)
            if rank > 0:
                first = torch.cat([top, x.narrow(dim, 0, span)], dim)
                out.narrow(dim, 0, self.above).copy_(conv_fn(first, padding=no_row_padding))
            if rank < n - 1:
                last = torch.cat([x.narrow(dim, rows - span, span), bottom], dim)
                out.narrow(dim, rows - self.below, self.below).copy_(conv_fn(last, padding=no_row_padding))
            return out
        return conv_fn(torch.cat([top, x, bottom], dim), padding=no_row_padding)


def _conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """`F.conv3d`, through oneDNN on a CPU for float32 inference. Torch picks oneDNN there only when batch x
    channels x frames x rows exceed 20480 (columns do not count): a strip of a few rows would take its slow
    path instead, with a column buffer of the kernel's volume times the input (27x for 3x3x3) and about 3x
    the time, where the whole map's conv took oneDNN."""
    if (
        input.device.type == "cpu"
        and input.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    ):
        return torch.ops.aten.mkldnn_convolution(input, weight, bias, padding, stride, dilation, groups)
    return F.conv3d(input, weight, bias, stride, padding, dilation, groups)


def _zero_rows(x: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """`count` rows of zeros shaped like `x`'s rows along `dim` (an image edge's missing halo)."""
    return x.new_zeros(*x.shape[:dim], count, *x.shape[dim + 1 :])


class PatchGroupNorm:
    """GroupNorm whose statistics cover the whole image, not just this strip.

    Ranks exchange per-group (mean, variance, count) and combine them exactly (Chan's parallel
    formula). In displaced steps the other strips' statistics are a step old; `groupnorm`
    picks how they are used (see ParallelConfig).
    """

    def __init__(self, norm: nn.GroupNorm, name: str, state: ParallelState) -> None:
        refuse_packed_weights(norm, f"GroupNorm {name!r}", "its affine weights are applied to the merged statistics")
        self.norm, self.name, self.state = norm, name, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, norm = self.state, self.norm
        if not state.split:
            return type(norm).forward(norm, x)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        groups = x.reshape(x.shape[0], norm.num_groups, -1).to(stat_dtype)
        var, mean = torch.var_mean(groups, dim=-1, unbiased=False)
        mode = state.config.groupnorm
        if state.naive or (mode == "separate" and not state.sync_step):
            pass  # local statistics only
        else:
            count = torch.full_like(mean, groups.shape[-1])
            local = torch.stack([mean, var, count], -1)
            if mode == "sync" or state.sync_step:
                mean, var = _combine(state.context(self.name, local, fresh=mode == "sync"))
            elif mode == "stale":  # other strips' previous statistics, this strip's fresh ones
                mean, var = _combine(state.context(self.name, local))
            else:  # corrected_async: previous global moments plus the change of the local ones
                others, old_local = state.context_and_own_previous(self.name, local)
                rank = state.partition.patch_rank
                old_mean, old_var = _combine(torch.cat([others[:rank], old_local[None], others[rank + 1 :]]))
                new_mean = old_mean + (mean - old_local[..., 0])
                second = old_var + old_mean**2 + (var + mean**2) - (old_local[..., 1] + old_local[..., 0] ** 2)
                new_var = second - new_mean**2
                # Stale moments can imply a negative variance; fall back to the local one there.
                mean, var = new_mean, torch.where(new_var < 0, var, new_var)
        # y = x * scale + shift per (sample, channel), computed as torch's own GroupNorm kernel does
        # (in float32 at least): in one pass that allocates only the output for float32/64 inputs.
        scale = torch.rsqrt(var + norm.eps)
        shift = -mean * scale
        per_channel = x.shape[1] // norm.num_groups
        scale = scale.repeat_interleave(per_channel, 1)
        shift = shift.repeat_interleave(per_channel, 1)
        if norm.affine:
            scale = scale * norm.weight
            shift = shift * norm.weight + norm.bias
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), groups.view(x.shape), scale.view(shape)).to(x.dtype)


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank (mean, variance, count) into the moments of the union of the strips."""
    mean, var, count = stats.unbind(-1)
    weight = count / count.sum(0)
    total_mean = (weight * mean).sum(0)
    total_var = (weight * (var + (mean - total_mean) ** 2)).sum(0)
    return total_mean, total_var


class PatchProcessor:
    """Base of the engine's attention processors. Each stands for the model's own processor
    (`original`, given back by `remove`) and reads the model's `ParallelState` (`state`); an adapter
    that needs a processor of its own derives it from this class, and the engine recognises it as one
    of its own (when checking a model again, and when giving processors back)."""

    state: ParallelState | None = None
    original: object = None


class PatchAttnProcessor(PatchProcessor):
    """Self-attention of a strip's queries over the keys/values of the whole image.

    Keys and values are projected in one matmul, straight into this rank's row of the exchange
    buffer. Other strips' keys/values are fresh in a synchronous step and the previous step's in
    a displaced one; this strip's are always fresh. With equal strips and one image per rank the
    attention reads the gathered buffer in place. Cross-attention (text keys/values) does not
    depend on the strip; its keys/values are computed once per image and reused while the text
    embedding is unchanged (in eager mode; a CUDA graph recomputes them, at no launch cost).
    """

    def __init__(
        self, attn: nn.Module | None = None, name: str = "", state: ParallelState | None = None, original=None
    ) -> None:
        # Without arguments (diffusers' IP-Adapter loader makes one so for every self-attention), the
        # processor is not yet bound to a model: it computes as `original`, diffusers' default, until
        # the engine adopts it before the next split call (see `distrifusion.ownership`).
        if attn is not None and attn.spatial_norm is not None:
            raise TypeError(f"distrifusion: attention {name!r} uses a spatial norm, which is not supported")
        self.name, self.state = name, state
        self.original = AttnProcessor2_0() if original is None else original

    def _fused_weights(self, attn: nn.Module):
        """(weight, bias) of the key and value projections side by side, or None if they are not
        plain linears (e.g. LoRA-wrapped); rebuilt when either is replaced or modified, and re-read
        at every new image (`ParallelState.reset`)."""
        k, v = attn.to_k, attn.to_v
        # Through the modules when a hook, a quantised weight or a storage dtype stands between them and their
        # weights (layerwise casting, offloading, torchao/bitsandbytes/GGUF): as the model computes.
        if not (self.state.direct_weights and type(k) is nn.Linear and type(v) is nn.Linear):
            return None
        if self.state.sharding is not None:  # whole only inside this block's forward (FSDP2): a fresh copy
            return torch.cat([k.weight, v.weight]), None if k.bias is None else torch.cat([k.bias, v.bias])
        version = (tensor_version(k.weight), tensor_version(v.weight), k.weight.data_ptr(), v.weight.data_ptr())
        cached = self.state.fused_kv.get(self.name)
        if cached is None or cached[0] is not k or cached[1] is not v or cached[4] != version:
            with normal_tensors():  # kept across images: refreshed in place, in any mode
                bias = None if k.bias is None else torch.cat([k.bias, v.bias])
                cached = self.state.fused_kv[self.name] = [k, v, torch.cat([k.weight, v.weight]), bias, version]
        return cached[2], cached[3]

    def _kv(self, attn: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Keys and values side by side, (batch, tokens, 2 * channels); written into `out` when it
        is a contiguous (batch, tokens, 2 * channels) tensor."""
        if isinstance(self.original, FusedAttnProcessor2_0) and attn.is_cross_attention:
            return attn.to_kv(x)  # what the fused processor computes (self-attention: see __call__)
        # Compiled (torch.compile), the projections stay separate: no version counters, no writes into exchange buffers.
        fused = None if torch.compiler.is_compiling() else self._fused_weights(attn)
        if fused is None:
            return torch.cat([attn.to_k(x), attn.to_v(x)], -1)
        weight, bias = fused
        direct = out is not None and out.shape[:2] == x.shape[:2] and out.is_contiguous()
        # out= kernels take no part in autocast or autograd: only in inference, when every dtype agrees.
        usable = direct and out.dtype == x.dtype == weight.dtype and not torch.is_grad_enabled()
        if not usable or _autocast_on(x.device):
            return F.linear(x, weight, bias)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if bias is None:
            torch.mm(flat_x, weight.t(), out=flat_out)
        else:
            torch.addmm(bias, flat_x, weight.t(), out=flat_out)
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        if state is None or not state.split or attention_mask is not None and encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"distrifusion: a self-attention mask in {self.name!r} cannot be split into strips")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        local_kv = None
        if isinstance(self.original, FusedAttnProcessor2_0) and encoder_hidden_states is None:
            # Fused QKV (`fuse_qkv_projections`): what that processor computes, from its fused linear (a
            # LoRA on to_q/to_k/to_v does not reach it there, so neither here)
            qkv = attn.to_qkv(hidden_states)
            query, local_kv = qkv.split([attn.to_q.out_features, qkv.shape[-1] - attn.to_q.out_features], -1)
        else:
            query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None:
            kv = self._cross_kv(attn, encoder_hidden_states)
        else:
            kv = self._self_kv(attn, hidden_states, local_kv)
        out = _attend(attn, query, kv)
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _self_kv(self, attn: nn.Module, hidden_states: torch.Tensor, kv: torch.Tensor | None) -> torch.Tensor:
        """Keys/values of every strip's tokens, in image order; this strip's fresh (`kv`, if given)."""
        state = self.state
        if state.naive:
            return self._kv(attn, hidden_states) if kv is None else kv
        if kv is None:
            row = None if torch.compiler.is_compiling() else state.own_row(self.name)
            kv = self._kv(attn, hidden_states, None if row is None else row[:, : hidden_states.shape[1]])
        return gather_tokens(state, self.name, kv, state.sizes(hidden_states.shape[1]))

    def _cross_kv(self, attn: nn.Module, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.state.graphs is not None or torch.compiler.is_compiling():
            return self._kv(attn, _norm_cross(attn, encoder_hidden_states))
        source = encoder_hidden_states
        weights = [attn.to_k, attn.to_v] + ([attn.norm_cross] if attn.norm_cross else [])
        # The same tensor, unmodified (views share the version counter), with the same weights and autocast.
        key = (source.data_ptr(), source.shape, source.stride(), source.dtype, tensor_version(source))
        key += tuple((p.data_ptr(), tensor_version(p)) for m in weights for p in m.parameters())
        key += (_autocast_on(source.device), torch.is_grad_enabled())
        if key[4] is None:  # inference-mode tensors keep no version: nothing tells they are unchanged
            return self._kv(attn, _norm_cross(attn, source))
        cached = self.state.cross_kv.get(self.name)
        if cached is None or cached[0] != key:
            # Holding `source` keeps its memory from being reused by another tensor at the same address.
            cached = self.state.cross_kv[self.name] = (key, self._kv(attn, _norm_cross(attn, source)), source)
        return cached[1]


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta): never on
        return False


def _norm_cross(attn: nn.Module, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


def _attend(attn: nn.Module, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of `query` over keys/values side by side in `kv`, then the output
    projection: what diffusers' AttnProcessor2_0 does after its projections."""
    batch = query.shape[0]
    key, value = kv.chunk(2, -1)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def gather_tokens(state: ParallelState, name: str, payload: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every patch rank's part of a per-token payload (batch, local tokens, c), in rank order:
    (batch, sum(sizes), c). This rank's part is `payload`; the others' are fresh in a synchronous
    step and the previous step's in a displaced one."""
    gathered = state.context(name, pad_to(payload, 1, max(sizes)), alone=True)
    if gathered.shape[1] == 1 and min(sizes) == max(sizes):  # (ranks, 1, tokens, c): read in place
        return gathered.view(1, -1, gathered.shape[-1])
    return torch.cat([gathered[j][:, :n] for j, n in enumerate(sizes)], 1)


def sum_over_strips(state: ParallelState, name: str, partial: torch.Tensor) -> torch.Tensor:
    """The sum over the patch ranks of a per-strip partial sum (a statistic that is a sum over tokens).

    This rank's term is `partial`; the others' are fresh in a synchronous step and the previous step's
    in a displaced one. The terms are added in rank order: in a synchronous step every rank adds the
    same numbers in the same order, so every rank holds bit for bit the same sum."""
    parts = state.context(name, partial.contiguous())
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


class PatchLinearAttnProcessor(PatchProcessor):
    """ReLU linear self-attention (diffusers' `SanaLinearAttnProcessor2_0`) of a strip's queries over
    the whole image.

    Per head, out_i = (sum_j v_j relu(k_j)^T) relu(q_i) / (sum_j relu(k_j)^T relu(q_i)): all a strip
    needs of the other strips is two sums over their tokens, sum_j v_j relu(k_j)^T (d x d) and
    sum_j relu(k_j) (d), which diffusers computes as one (d + 1) x d matrix by padding the values with a
    row of ones. Each rank computes its strip's matrix, the ranks' matrices are added
    (`sum_over_strips`), and each rank applies the sum to its own queries. So the bytes exchanged per
    layer, batch x heads x (d + 1) x d in float32, do not depend on the image size. As diffusers does,
    queries, keys and values are computed on in float32 whatever the model's dtype, so summing strips
    differs from one process by float32 rounding (not float64's, in a float64 model).
    """

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original) -> None:
        self.name, self.state, self.original = name, state, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        state = self.state
        if not state.split or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        # diffusers' processor takes an attention mask and ignores it: so does this one.
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()  # (batch, heads, d, tokens)
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()  # (..., tokens, d)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)  # (batch, heads, d + 1, tokens)
        sums = torch.matmul(value, key)  # this strip's (batch, heads, d + 1, d)
        if not state.naive:
            sums = sum_over_strips(state, self.name, sums)
        out = torch.matmul(sums, query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class PatchJointAttnProcessor(PatchProcessor):
    """Joint attention of text and image tokens (Flux.1/2, SD3, Qwen-Image) with the image split in strips.
    The queries are this rank's tokens; the keys/values are every strip's image tokens (this
    strip's fresh, the others' fresh in a synchronous step and a step old in a displaced one)
    plus the text tokens: all of them on every rank, or, with sharded text, this rank's fresh
    and the others' exchanged like image tokens. Queries and keys keep the model's own order of
    text and image tokens (softmax attention does not depend on the order of the keys, but its
    rounding does: in that order a synchronous step is bit-identical to one process).

    One processor serves every joint-attention family; the adapter says the text's place:
    `text_first` (Flux, Qwen-Image: [text, image]; SD3: [image, text]) and `text_in_hidden` (Flux's
    single-stream blocks pass text and image concatenated in `hidden_states`, without
    `encoder_hidden_states`). An attention without text (SD3.5's second, image-only attention)
    is the same processor with no text tokens.

    Rotary embeddings cover the call's own tokens and keys are exchanged after them; by default they
    are (cos, sin) tables of the call's tokens in the model's order, applied as diffusers'
    `apply_rotary_emb` (Flux): `split_rotary(rotary, text tokens, image tokens, text_first)` gives
    (text's, image's) and `rotate(x, table)` applies one for other layouts (Qwen-Image: a pair of
    complex tables, image's and text's; HunyuanVideo-1.5: `image_rotary`, the video's only).

    A text mask (`encoder_hidden_states_mask`, Qwen-Image: padded prompts of a batch) masks text
    keys; sharded text carries it: each rank's share of the mask travels with its share of the
    keys, fresh or stale alike, so a rank whose share is all padding takes part as any other.

    Reference-image tokens (`Partition.extra`: Flux.1 Kontext, Qwen-Image-Edit, Flux.2 with
    reference images) follow the strip's tokens in the image stream: context for the image, not
    rows of it. They are keys like the text's: all of them on every rank, or a share each,
    exchanged fresh or stale like the text's.
    """

    def __init__(
        self,
        attn: nn.Module,
        name: str,
        state: ParallelState,
        original,
        *,
        text_first: bool,
        text_in_hidden: bool,
        split_rotary=None,
        rotate=None,
    ) -> None:
        self.name, self.state, self.original = name, state, original
        self.text_first, self.text_in_hidden = text_first, text_in_hidden
        self.split_rotary = split_rotary or joined_rotary
        self.rotate = rotate or _rotate_real

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        encoder_hidden_states_mask=None,
        **kwargs,
    ):
        if not self.state.split:
            if image_rotary_emb is not None:
                kwargs["image_rotary_emb"] = image_rotary_emb
            if encoder_hidden_states_mask is not None:
                kwargs["encoder_hidden_states_mask"] = encoder_hidden_states_mask
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        self.refuse(attention_mask, kwargs)
        out_txt, out_img = self.attend(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, encoder_hidden_states_mask
        )
        if out_txt is None:
            return _project_out(attn, out_img)
        if encoder_hidden_states is None:  # single-stream: the block projects the concatenation itself
            return torch.cat([out_txt, out_img] if self.text_first else [out_img, out_txt], 1)
        out_img = _project_out(attn, out_img)
        if getattr(attn, "to_add_out", None) is not None:
            out_txt = attn.to_add_out(out_txt.contiguous())
        return out_img, out_txt

    def refuse(self, attention_mask, kwargs: dict) -> None:
        """Arguments the split attention cannot honour: an attention mask over every token, and others."""
        if attention_mask is not None or kwargs:
            extra = ["attention_mask"] * (attention_mask is not None) + sorted(kwargs)
            raise ValueError(f"distrifusion: attention {self.name!r} got {extra}, which cannot be split into strips")

    def project(self, attn, x: torch.Tensor, added: bool, rotary):
        """Queries and keys/values of one stream's tokens (see `heads`): what the model projects with."""
        if x.shape[1] == 0:  # a rank whose share of sharded text tokens is empty (fewer tokens than ranks)
            return heads(attn, *(x.new_empty(*x.shape[:2], attn.to_q.out_features),) * 3, None, None, None, None)
        fused, to_q, to_k, to_v, norm_q, norm_k = _joint_projections(attn, self.original, added)
        projected = fused(x).chunk(3, -1) if fused is not None else (to_q(x), to_k(x), to_v(x))
        return heads(attn, *projected, norm_q, norm_k, rotary, self.rotate)

    def attend(self, attn, hidden_states, encoder_hidden_states, rotary, text_mask):
        """(text, image) attention outputs of this rank's tokens, before the output projections (text
        None without text tokens). The image stream's tokens are the strip's then its reference tokens."""
        state = self.state
        partition = state.partition
        added = encoder_hidden_states is not None
        if added:
            image, text = hidden_states, encoder_hidden_states
        elif self.text_in_hidden:
            n_text = partition.text[partition.patch_rank]
            cut = n_text if self.text_first else hidden_states.shape[1] - n_text
            first, second = hidden_states[:, :cut], hidden_states[:, cut:]
            text, image = (first, second) if self.text_first else (second, first)
        else:
            image, text = hidden_states, None
        n_text = 0 if text is None else text.shape[1]
        text_rotary = image_rotary = None
        if rotary is not None:  # rotary tables for the call's tokens
            text_rotary, image_rotary = self.split_rotary(rotary, n_text, image.shape[1], self.text_first)
        q_img, kv_img = self.project(attn, image, False, image_rotary)
        exchange = not state.naive
        sharded = partition.sharded_text and exchange
        refs = partition.extra[partition.patch_rank] if partition.extra else 0
        grid = image.shape[1] - refs
        grid_sizes = state.sizes(grid) if exchange else [grid]
        n_refs = sum(partition.extra) if sharded else refs
        n_keys = (sum(partition.text) if sharded else n_text) if text is not None else 0
        # Keys in the model's own order, [text, grid, reference tokens] or [grid, reference tokens, text]: the
        # order of a softmax's terms changes its rounding, and synchronous steps must compute what one process
        # does. Each part is copied in as soon as it is exchanged: it may be a view of an exchange buffer, which
        # the next exchange call sends off (in a displaced step the others' fresh rows then land in it while this
        # step still needs their previous ones).
        n_grid = sum(grid_sizes)
        kv = kv_img.new_empty(kv_img.shape[0], n_keys + n_grid + n_refs, kv_img.shape[2])
        at = n_keys if self.text_first else 0  # where the image's keys start
        kv_grid = kv_img[:, :grid]
        kv[:, at : at + n_grid] = gather_tokens(state, self.name, kv_grid, grid_sizes) if exchange else kv_grid
        if refs or n_refs:
            kv_refs = kv_img[:, grid:]
            kv[:, at + n_grid : at + n_grid + n_refs] = (
                gather_tokens(state, self.name + ".refs", kv_refs, list(partition.extra)) if sharded else kv_refs
            )
        mask = None
        if text is None:
            query = q_img
        else:
            q_txt, kv_txt = self.project(attn, text, added, text_rotary)
            at_text = slice(0, n_keys) if self.text_first else slice(n_grid + n_refs, None)
            kv[:, at_text] = (
                gather_tokens(state, self.name + ".text", kv_txt, list(partition.text)) if sharded else kv_txt
            )
            query = torch.cat([q_txt, q_img] if self.text_first else [q_img, q_txt], 1)
            if text_mask is not None or (sharded and partition.text_mask):
                mask = self._key_mask(text_mask, sharded, kv)
        key, value = kv.unflatten(-1, (attn.heads, -1)).transpose(1, 2).chunk(2, -1)  # (batch, heads, tokens, d)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key, value, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        if text is None:
            return None, out
        if self.text_first:
            return out[:, :n_text], out[:, n_text:]
        return out[:, image.shape[1] :], out[:, : image.shape[1]]

    def _key_mask(self, text_mask: torch.Tensor | None, sharded: bool, kv: torch.Tensor) -> torch.Tensor:
        """The (batch, 1, 1, keys) boolean mask of the keys (in the model's order): the text's own, every
        other key attended. Sharded, every rank's share of the text mask is exchanged with its share of the
        keys, as 0/1 values in a payload of its own (which any codec carries exactly: a block of 0s and 1s
        scales 1 to the code's largest value); a rank whose share is empty (no mask given to it) sends none."""
        partition = self.state.partition
        if text_mask is None:  # an empty share of the text tokens
            text_mask = kv.new_ones(kv.shape[0], 0)
        if sharded:
            shares = text_mask.to(kv.dtype)[..., None]  # in the keys' dtype: one bucket with the others
            text_mask = gather_tokens(self.state, self.name + ".mask", shares, list(partition.text))[..., 0] > 0.5
        rest = text_mask.new_ones(text_mask.shape[0], kv.shape[1] - text_mask.shape[1])
        parts = [text_mask.bool(), rest] if self.text_first else [rest, text_mask.bool()]
        return torch.cat(parts, 1)[:, None, None, :]


class PatchTokenAttnProcessor(PatchProcessor):
    """Self-attention of a strip's tokens over every strip's keys/values, for attention classes that
    compute their queries, keys and values their own way (Wan: a norm across heads, its own rotary
    layout): the adapter gives `project(attn, hidden_states, *args) -> (query, key, value)`, each
    (batch, tokens, heads, head_dim) exactly as the model's processor computes them (norms and
    rotations applied), and `finish(attn, out) -> output`, the processor's output projection.

    Keys/values are exchanged after their norm and rotation, so each carries its own position and
    their order among the keys does not matter; this strip's are fresh, the others' fresh in a
    synchronous step and a step old in a displaced one (`gather_tokens`). Calls with
    `encoder_hidden_states` (cross-attention, local to a strip) and unsplit calls run the original.
    """

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original, *, project, finish) -> None:
        self.name, self.state, self.original = name, state, original
        self.project, self.finish = project, finish

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        state = self.state
        if not state.split or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"distrifusion: a self-attention mask in {self.name!r} cannot be split into strips")
        query, key, value = self.project(attn, hidden_states, *args, **kwargs)
        kv = torch.cat([key, value], -1).flatten(2)  # (batch, tokens, heads * 2 * head_dim)
        if not state.naive:
            kv = gather_tokens(state, self.name, kv, state.sizes(hidden_states.shape[1]))
        key, value = kv.unflatten(-1, (query.shape[2], -1)).transpose(1, 2).chunk(2, -1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key, value)
        return self.finish(attn, out.transpose(1, 2).flatten(2).type_as(query))


def joined_rotary(rotary: tuple, n_text: int, n_image: int, text_first: bool) -> tuple:
    """(text's, image's) rotary tables from tables of the call's tokens in the model's order (Flux)."""
    split = n_text if text_first else n_image
    first, second = tuple(t[:split] for t in rotary), tuple(t[split:] for t in rotary)
    return (first, second) if text_first else (second, first)


def image_rotary(rotary: tuple, n_text: int, n_image: int, text_first: bool) -> tuple:
    """Rotary tables of the image tokens only; the text is not rotated (HunyuanVideo-1.5)."""
    return None, rotary


def _rotate_real(x: torch.Tensor, table) -> torch.Tensor:
    return apply_rotary_emb(x, table, sequence_dim=1)


def heads(attn, query, key, value, norm_q, norm_k, rotary, rotate):
    """Queries (batch, tokens, heads, head_dim) and keys/values side by side per head, flattened
    (batch, tokens, heads * 2 * head_dim), from projected tokens: normalised and rotated as the model does."""
    query, key, value = (p.unflatten(-1, (attn.heads, -1)) for p in (query, key, value))
    if query.shape[1] == 0:
        return query, torch.cat([key, value], -1).flatten(2)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    if rotary is not None:
        query, key = rotate(query, rotary), rotate(key, rotary)
    return query, torch.cat([key, value], -1).flatten(2)


def _joint_projections(attn, original, added: bool) -> tuple:
    """(fused linear or None, to_q, to_k, to_v, norm_q, norm_k) of the image tokens or of the added
    (text) stream: what the model's own processor projects with. After `fuse_qkv_projections` that is
    the fused linear (Flux: `fused_projections`; SD3: its fused processor, which skips the q/k norms)."""
    if added:
        names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
    else:
        names = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
    to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, name, None) for name in names)
    sd3_fused = isinstance(original, FusedJointAttnProcessor2_0)
    fused = None
    if sd3_fused or getattr(attn, "fused_projections", False):
        fused = getattr(attn, "to_added_qkv" if added else "to_qkv", None)
    if sd3_fused:
        norm_q = norm_k = None
    return fused, to_q, to_k, to_v, norm_q, norm_k


def _project_out(attn, out: torch.Tensor) -> torch.Tensor:
    if getattr(attn, "pre_only", False):  # Flux's single-stream attention: the block projects
        return out
    return attn.to_out[1](attn.to_out[0](out.contiguous()))


class StripPatchEmbed:
    """A transformer's patch embedding (kernel = stride = patch size: no halo) of one strip,
    with the positional embedding of the whole image, sliced to the strip's tokens.

    SD3 crops its positional table around the centre of the input it is given, and PixArt builds
    a sin-cos grid from the input's size: on a strip alone both would give the wrong positions.
    """

    def __init__(self, embed: nn.Module, name: str, state: ParallelState) -> None:
        if not embed.flatten:
            raise TypeError(f"distrifusion: patch embedding {name!r} does not flatten to tokens; not supported")
        self.embed, self.name, self.state = embed, name, state

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        embed, state = self.embed, self.state
        if not state.split:
            return type(embed).forward(embed, latent)
        x = embed.proj(latent).flatten(2).transpose(1, 2)
        if embed.layer_norm:
            x = embed.norm(x)
        if embed.pos_embed is None:
            return x
        partition, patch = state.partition, embed.patch_size
        positions = full_positions(embed, partition.height, partition.width, x.device)
        start = partition.row_start // patch * (partition.width // patch)
        return (x + positions[:, start : start + x.shape[1]]).to(x.dtype)


def full_positions(embed: nn.Module, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The positional embedding diffusers' PatchEmbed adds to a `height` x `width` latent."""
    if embed.pos_embed_max_size:
        return embed.cropped_pos_embed(height, width)
    rows, cols = height // embed.patch_size, width // embed.patch_size
    if (embed.height, embed.width) == (rows, cols):
        return embed.pos_embed
    table = get_2d_sincos_pos_embed(
        embed_dim=embed.pos_embed.shape[-1],
        grid_size=(rows, cols),
        base_size=embed.base_size,
        interpolation_scale=embed.interpolation_scale,
        device=device,
        output_type="pt",
    )
    return table.float().unsqueeze(0)


class PatchZeroPadDownsample:
    """diffusers' `Downsample2D` with `padding=0` (VAE encoders): it pads one zero row and column
    at the bottom and right of the image, then runs a 3x3 stride-2 conv without padding. On a strip
    only the image's last strip may get the zero row; the others need their neighbour's first row,
    which the (patch-parallel) conv takes as its halo. So: pad columns only, let the conv do rows."""

    def __init__(self, down: nn.Module, name: str, state: ParallelState) -> None:
        if down.norm is not None:
            raise TypeError(f"distrifusion: downsampler {name!r} has a norm; not supported")
        self.down, self.name, self.state = down, name, state

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.state.split:
            return type(self.down).forward(self.down, hidden_states, *args, **kwargs)
        return self.down.conv(F.pad(hidden_states, (0, 1, 0, 0)))


class PatchZeroPad:
    """An `nn.ZeroPad2d` in front of a halo conv (`PatchConv2d`) that pads no top rows and as many
    bottom rows as the conv's halo below (e.g. one zero row and column at the bottom and right, then
    a 3x3 stride-2 conv without padding: video VAE encoders). On a strip it pads the columns only:
    the image's last strip gets its zero rows from the conv as its missing halo, the others their
    neighbour's first rows. The adapter that installs it checks that the conv behind it is such a one."""

    def __init__(self, pad: nn.ZeroPad2d, name: str, state: ParallelState) -> None:
        left, right, top, _ = pad.padding
        if top:
            raise TypeError(f"distrifusion: zero padding {name!r} pads {top} top rows; not supported")
        self.pad, self.name, self.state, self.columns = pad, name, state, (left, right)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.split:
            return type(self.pad).forward(self.pad, x)
        return F.pad(x, (*self.columns, 0, 0))


class PatchFreeU:
    """A UNet up block (the first two resolutions) with FreeU exact on a strip.

    FreeU scales the first half of the backbone's channels (per element: local to a strip) and
    passes every skip feature map through a Fourier filter that scales its lowest frequencies,
    `x + (s - 1) * lowpass(x)`: a filter over the whole map. Its low-pass keeps only a
    2t x 2t box of frequencies, each of which is a sum over the whole map's rows, so every rank
    projects its strip on them, the ranks add their projections (fresh in a synchronous step, the
    other strips' of the previous step in a displaced one: a few numbers per channel), and each
    rank rebuilds the low-pass on its own rows. diffusers' own filter, which would see only the
    strip, is given a scale of 1, the identity.
    """

    THRESHOLD = 1  # diffusers' apply_freeu: fourier_filter(..., threshold=1)

    def __init__(self, block: nn.Module, name: str, state: ParallelState) -> None:
        self.block, self.name, self.state = block, name, state
        self.signature = inspect.signature(type(block).forward)
        self._bases: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, *args, **kwargs):
        block, forward = self.block, type(self.block).forward
        scale_attr = {0: "s1", 1: "s2"}.get(getattr(block, "resolution_idx", None))
        enabled = all(getattr(block, a, None) for a in ("s1", "s2", "b1", "b2"))  # as diffusers decides
        if not (self.state.split and enabled and scale_attr):
            return forward(block, *args, **kwargs)
        bound = self.signature.bind(block, *args, **kwargs)
        scale = getattr(block, scale_attr)
        skips = bound.arguments["res_hidden_states_tuple"]
        bound.arguments["res_hidden_states_tuple"] = tuple(self._filter(x, scale, i) for i, x in enumerate(skips))
        setattr(block, scale_attr, 1.0)
        try:
            return forward(*bound.args, **bound.kwargs)
        finally:
            setattr(block, scale_attr, scale)

    def _filter(self, x: torch.Tensor, scale: float, index: int) -> torch.Tensor:
        state = self.state
        sizes = state.sizes(x.shape[2])
        top, height, width = sum(sizes[: state.partition.patch_rank]), sum(sizes), x.shape[3]
        real = torch.float64 if x.dtype == torch.float64 else torch.float32  # diffusers filters in float32
        complex_ = torch.complex128 if real == torch.float64 else torch.complex64
        rows, cols = self._basis(top, x.shape[2], height, width, x.device, complex_)
        partial_spectrum = torch.einsum("bchw,kh,lw->bckl", x.to(complex_), rows, cols)
        if state.naive:
            spectrum = partial_spectrum
        else:
            parts = state.context(f"{self.name}.freeu{index}", torch.view_as_real(partial_spectrum))
            spectrum = torch.view_as_complex(parts.sum(0).contiguous())
        lowpass = torch.einsum("bckl,kh,lw->bchw", spectrum, rows.conj(), cols.conj()).real / (height * width)
        return (x.to(real) + (scale - 1) * lowpass).to(x.dtype)

    def _basis(self, top: int, rows: int, height: int, width: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The Fourier bases of this strip's rows and of the columns, on `device`. Made once per strip
        shape by kernels on the device (no copy from the host: inside a CUDA graph's capture a copy from
        pageable memory fails) and kept, so the captured step reads the tensors an eager step made.
        Nothing is kept from inside a capture: a tensor made there holds its values only in replays."""
        key = (top, rows, height, width, str(device), dtype)
        bases = self._bases.get(key)
        if bases is None:
            bases = (
                _fourier_basis(_box(height, self.THRESHOLD, device), top, rows, height).to(dtype),
                _fourier_basis(_box(width, self.THRESHOLD, device), 0, width, width).to(dtype),
            )
            if not _capturing(device):
                self._bases[key] = bases
        return bases


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _box(size: int, threshold: int, device=None) -> torch.Tensor:
    """The frequencies that FreeU's mask scales along a dimension of `size`: shifted indices
    [size//2 - t, size//2 + t), sliced as diffusers slices its mask (a tensor slice: a negative start
    counts from the end)."""
    shifted = torch.fft.fftshift(torch.fft.fftfreq(size, device=device) * size).round().long()
    centre = size // 2
    return shifted[centre - threshold : centre + threshold]


def _fourier_basis(freqs: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """exp(-2 pi i f p / size) for every frequency f (rows) and position p in [start, start + count)
    (columns), in float64, on the device of `freqs`."""
    positions = torch.arange(start, start + count, device=freqs.device, dtype=torch.float64)
    angle = -2 * torch.pi * freqs[:, None].double() * positions[None, :] / size
    return torch.polar(torch.ones_like(angle), angle)
