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
                mean, var = _combine(state.context(self.name, local, fresh=True))
            else:
                previous = state.context(self.name, local)
                rank = state.plan.patch_rank
                if mode == "stale":
                    mean, var = _combine(torch.cat([previous[:rank], local[None], previous[rank + 1 :]]))
                else:  # corrected_async: previous global moments plus the change of the local ones
                    old_mean, old_var = _combine(previous)
                    old_local = previous[rank]
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

    Keys and values are projected in one matmul. Other strips' keys/values are fresh in a
    synchronous step and the previous step's in a displaced one; this strip's are always fresh.
    Cross-attention (text keys/values) does not depend on the strip and runs the original
    processor unchanged.
    """

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original) -> None:
        if attn.spatial_norm is not None:
            raise TypeError(f"distrifusion: attention {name!r} uses a spatial norm, which is not supported")
        self.name, self.state, self.original = name, state, original
        self._fused: tuple | None = None

    def _kv(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        k, v = attn.to_k, attn.to_v
        if not (type(k) is nn.Linear and type(v) is nn.Linear):  # e.g. LoRA-wrapped projections
            return torch.cat([k(x), v(x)], -1)
        version = (k.weight._version, v.weight._version, k.weight.data_ptr(), v.weight.data_ptr(), x.dtype)
        if self._fused is None or self._fused[0] != version:
            bias = None if k.bias is None else torch.cat([k.bias, v.bias])
            self._fused = (version, torch.cat([k.weight, v.weight]), bias)
        return F.linear(x, self._fused[1], self._fused[2])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        if encoder_hidden_states is not None or not state.split:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise ValueError(f"distrifusion: a self-attention mask in {self.name!r} cannot be split into strips")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        kv = self._kv(attn, hidden_states)
        if not state.naive:
            tokens = state.sizes(kv.shape[1])
            others = state.context(self.name, _pad_to(kv, 1, max(tokens)))
            rank = state.plan.patch_rank
            kv = torch.cat([kv if j == rank else others[j][:, :n] for j, n in enumerate(tokens)], 1)
        key, value = kv.chunk(2, -1)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
