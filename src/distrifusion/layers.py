"""The patch-parallel layers: conv halos, GroupNorm statistics and self-attention context.

Each is a small callable installed on one module of an ordinary model (as the module's
`forward`, or as an attention processor) and removed by deleting it again. Each asks the
model's `ParallelState` for the split and for the other strips' context; none of them keeps
state of its own beyond weights it derives from its module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .state import ParallelState


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `t` along `dim` to `size`: all-gathers need equally shaped payloads."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)


class PatchConv2d:
    """A Conv2d over one strip of rows, with halo rows taken from the neighbouring strips.

    Output row `o` of a conv reads input rows `o*stride - pad + i*dilation`; for a strip whose
    first row is a multiple of the stride, that needs `pad` rows above it and
    `(k-1)*dilation + 1 - stride - pad` rows below it. Image edges get zeros, as the conv's own
    zero padding would give them.
    """

    def __init__(self, conv: nn.Conv2d, name: str, state: ParallelState) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(
                f"distrifusion: conv {name!r} uses padding {conv.padding!r}/{conv.padding_mode!r}; "
                "only numeric zero padding can be split into strips"
            )
        kernel, stride, pad, dilation = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
        self.above = pad
        self.below = (kernel - 1) * dilation + 1 - stride - pad
        if self.below < 0:
            raise TypeError(
                f"distrifusion: conv {name!r} (kernel {kernel}, stride {stride}, padding {pad}) "
                "does not map strips to strips"
            )
        self.conv, self.name, self.state = conv, name, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state, conv = self.state, self.conv
        if not state.split or state.naive:
            return type(conv).forward(conv, x)  # zero padding at strip edges is exactly "naive"
        rank, n = state.plan.patch_rank, state.plan.patch_size
        rows = x.shape[2]
        if rows < max(self.above, self.below):
            raise ValueError(
                f"distrifusion: a strip of {rows} rows is thinner than the halo of conv "
                f"{self.name!r}; use fewer ranks or a larger height"
            )
        # Rows this strip lends: its top rows to the strip above, its bottom rows to the one below.
        edges = torch.cat([x[:, :, : self.below], x[:, :, rows - self.above :]], 2)
        others = state.context(self.name, edges)
        zeros = x.new_zeros(x.shape[0], x.shape[1], 0, x.shape[3])
        top = others[rank - 1][:, :, self.below :] if rank > 0 else _pad_to(zeros, 2, self.above)
        bottom = others[rank + 1][:, :, : self.below] if rank < n - 1 else _pad_to(zeros, 2, self.below)
        x = torch.cat([top, x, bottom], 2)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


class PatchGroupNorm:
    """GroupNorm whose statistics cover the whole image, not just this strip.

    Ranks exchange per-group (mean, variance, count) and combine them exactly (Chan's parallel
    formula). In displaced steps the other strips' statistics are a step old; `groupnorm`
    picks how they are used (see ParallelConfig).
    """

    def __init__(self, norm: nn.GroupNorm, name: str, state: ParallelState) -> None:
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
                rank = state.plan.patch_rank
                old_mean, old_var = _combine(torch.cat([others[:rank], old_local[None], others[rank + 1 :]]))
                new_mean = old_mean + (mean - old_local[..., 0])
                second = old_var + old_mean**2 + (var + mean**2) - (old_local[..., 1] + old_local[..., 0] ** 2)
                new_var = second - new_mean**2
                # Stale moments can imply a negative variance; fall back to the local one there.
                mean, var = new_mean, torch.where(new_var < 0, var, new_var)
        out = (groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        out = out.view(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.view(shape) + norm.bias.view(shape)
        return out.to(x.dtype)


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank (mean, variance, count) into the moments of the union of the strips."""
    mean, var, count = stats.unbind(-1)
    weight = count / count.sum(0)
    total_mean = (weight * mean).sum(0)
    total_var = (weight * (var + (mean - total_mean) ** 2)).sum(0)
    return total_mean, total_var


class PatchAttnProcessor:
    """Self-attention of a strip's queries over the keys/values of the whole image.

    Keys and values are projected in one matmul, straight into this rank's row of the exchange
    buffer. Other strips' keys/values are fresh in a synchronous step and the previous step's in
    a displaced one; this strip's are always fresh. With equal strips and one image per rank the
    attention reads the gathered buffer in place. Cross-attention (text keys/values) does not
    depend on the strip; its keys/values are computed once per image and reused while the text
    embedding is unchanged (in eager mode; a CUDA graph recomputes them, at no launch cost).
    """

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original) -> None:
        if attn.spatial_norm is not None:
            raise TypeError(f"distrifusion: attention {name!r} uses a spatial norm, which is not supported")
        self.name, self.state, self.original = name, state, original
        self._fused: tuple | None = None

    def _fused_weights(self, attn: nn.Module, dtype: torch.dtype):
        """(weight, bias) of the key and value projections side by side, or None if they are not
        plain linears (e.g. LoRA-wrapped); rebuilt whenever either weight changes."""
        k, v = attn.to_k, attn.to_v
        if not (type(k) is nn.Linear and type(v) is nn.Linear):
            return None
        version = (tensor_version(k.weight), tensor_version(v.weight), k.weight.data_ptr(), v.weight.data_ptr(), dtype)
        if self._fused is None or self._fused[0] != version:
            bias = None if k.bias is None else torch.cat([k.bias, v.bias])
            self._fused = (version, torch.cat([k.weight, v.weight]), bias)
        return self._fused[1:]

    def _kv(self, attn: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Keys and values side by side, (batch, tokens, 2 * channels); written into `out` when it
        is a contiguous (batch, tokens, 2 * channels) tensor."""
        fused = self._fused_weights(attn, x.dtype)
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
        if not state.split or attention_mask is not None and encoder_hidden_states is not None:
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
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None:
            kv = self._cross_kv(attn, encoder_hidden_states)
        else:
            kv = self._self_kv(attn, hidden_states)
        out = _attend(attn, query, kv)
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _self_kv(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Keys/values of every strip's tokens, in image order; this strip's fresh."""
        state = self.state
        if state.naive:
            return self._kv(attn, hidden_states)
        tokens = state.sizes(hidden_states.shape[1])
        row = state.own_row(self.name)
        kv = self._kv(attn, hidden_states, None if row is None else row[:, : hidden_states.shape[1]])
        gathered = state.context(self.name, _pad_to(kv, 1, max(tokens)), alone=True)
        if gathered.shape[1] == 1 and min(tokens) == max(tokens):  # (ranks, 1, tokens, c): one image's tokens
            return gathered.view(1, -1, gathered.shape[-1])
        return torch.cat([gathered[j][:, :n] for j, n in enumerate(tokens)], 1)

    def _cross_kv(self, attn: nn.Module, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.state.graphs is not None:
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


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


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
