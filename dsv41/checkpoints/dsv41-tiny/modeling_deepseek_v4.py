"""DeepSeek-V4 in plain PyTorch, as a transformers model (reference path; fast MoE paths plug in
through ``moe_deepseek_v4.MOE_BACKENDS``).

Module names equal transformers' in-memory names (``model.layers.N.self_attn.q_a_proj`` ...), so a
state dict moves between this model and ``transformers.DeepseekV4ForCausalLM`` unchanged; the
official release naming (``layers.N.attn.wq_a``) is produced and read by ``checkpoint_deepseek_v4``.

Shapes: B batch, S new tokens, N hc streams, D hidden, H heads, d head_dim, r RoPE width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_deepseek_v4 import DeepseekV4Config
from .moe_deepseek_v4 import MOE_BACKENDS, resolve_backend

# transformers renamed the outputs' `past_key_values` field to `cache` during the 5.x series
_CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------- norms and RoPE
class DeepseekV4RMSNorm(nn.Module):
    """RMSNorm computed in fp32 with an fp32 weight; the result is cast back once."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (one per interleaved channel pair) for plain RoPE or YaRN."""
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponent)
    if params.get("rope_type", "default") != "yarn":
        return inv_freq
    # YaRN: interpolate the low frequencies by `factor`, keep the high ones, linear ramp between
    # the dimensions that complete beta_fast and beta_slow rotations over the original context.
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep frequency), 0 = interpolate (divide by factor)
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


class DeepseekV4RotaryEmbedding(nn.Module):
    """cos/sin tables for the "main" RoPE (sliding layers) and the "compress" RoPE (CSA/HCA layers)."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.labels = ("main", "compress")
        self.scaling = {}
        for label in self.labels:
            params = config.rope_parameters[label]
            self.register_buffer(f"{label}_inv_freq", rope_inv_freq(params, config.head_dim), persistent=False)
            self.scaling[label] = float(params.get("attention_factor", 1.0)) if params.get("rope_type") == "yarn" else 1.0

    def forward(self, positions: torch.Tensor, label: str, dtype: torch.dtype):
        inv_freq = getattr(self, f"{label}_inv_freq")
        freqs = positions[..., None].float() * inv_freq.to(positions.device)
        return (freqs.cos() * self.scaling[label]).to(dtype), (freqs.sin() * self.scaling[label]).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the trailing RoPE slice of ``x``; ``cos``/``sin`` broadcast to
    ``x[..., :r/2]``. Heads are laid out [no-RoPE | RoPE]. Each pair (a, b) is the complex number
    a + ib multiplied by cos + i sin, computed in fp32."""
    r = 2 * cos.shape[-1]
    pairs = torch.view_as_complex(x[..., -r:].float().reshape(*x.shape[:-1], r // 2, 2))
    rotated = torch.view_as_real(pairs * torch.complex(cos.float(), sin.float())).flatten(-2)
    out = x.clone()
    out[..., -r:] = rotated
    return out


# ----------------------------------------------------------------------------- cache
class DeepseekV4LayerState:
    """Per-layer generation state: the last ``sliding_window - 1`` K=V rows with their positions, and
    per batch row the compressor state (pending tokens of the open window, the previous window's
    overlap half for CSA, and the compressed entries emitted so far), for the main compressor and
    the indexer's own compressor."""

    def __init__(self, layer_type: str):
        self.layer_type = layer_type
        self.keys: torch.Tensor | None = None  # [B, L, d]
        self.key_pos: torch.Tensor | None = None  # [B, L], -1 = padding
        self.rows: list[dict] | None = None  # per batch row: {name: CompressorRowState}
        # past recording (for crop): keys are not trimmed to the window and the compressors keep
        # what they were fed since the last mark, until the next crop
        self.record_past = False

    def mark(self) -> None:
        """Start a new rollback point: trim the keys to the window, reset the compressors' history."""
        if self.rows is not None:
            for row in self.rows:
                for state in row.values():
                    state.mark(self.record_past)

    def crop(self, slots: int, real_per_row: list[int], keep: int) -> None:
        """Remove the last ``slots`` token slots (``real_per_row[b]`` of them real tokens in row b)."""
        if self.keys is not None:
            end = self.keys.shape[1] - slots
            start = max(0, end - keep) if keep else end
            self.keys, self.key_pos = self.keys[:, start:end], self.key_pos[:, start:end]
        if self.rows is not None:
            for row, n in zip(self.rows, real_per_row):
                for state in row.values():
                    state.rollback(n, self.record_past)

    def select(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.key_pos = self.key_pos.index_select(0, index.to(self.key_pos.device))
        if self.rows is not None:
            self.rows = [{name: state.copy() for name, state in self.rows[i].items()} for i in index.tolist()]


class CompressorRowState:
    __slots__ = ("pending_kv", "pending_gate", "overlap_kv", "overlap_gate", "entries", "count", "rate", "base", "fed",
                 "window_overlaps")

    def __init__(self):
        self.pending_kv = self.pending_gate = None  # [n < m, width]
        self.overlap_kv = self.overlap_gate = None  # [m, d] (CSA only)
        self.entries = None  # [count, d]
        self.count = 0  # compressed entries emitted
        self.rate = None  # compress rate m, known once fed
        # rollback history while recording: the state at the last mark, the projected rows fed since,
        # and the overlap half of every window closed since (CSA)
        self.base = self.fed = self.window_overlaps = None

    def copy(self) -> "CompressorRowState":
        new = CompressorRowState()
        for slot in self.__slots__:
            value = getattr(self, slot)
            setattr(new, slot, list(value) if isinstance(value, list) else value)
        return new

    def mark(self, recording: bool) -> None:
        if recording:
            self.base = (self.count, self.pending_kv, self.pending_gate, self.overlap_kv, self.overlap_gate)
            self.fed, self.window_overlaps = [], []
        else:
            self.base = self.fed = self.window_overlaps = None

    def record(self, kv, gate, window_kv=None, window_gate=None) -> None:
        """While recording: the new projected rows, and the overlap halves of the windows just closed."""
        if self.fed is not None:
            self.fed.append((kv, gate))
            if window_kv is not None:
                self.window_overlaps.extend(zip(window_kv, window_gate))

    def rollback(self, n: int, recording: bool) -> None:
        """Forget the last ``n`` real tokens fed since the last mark (entries of windows that close
        before the new end are kept; the open window's rows come back from the history)."""
        if n and self.rate is not None:  # (states of layers without this compressor are never fed)
            if self.fed is None:
                raise RuntimeError("DeepseekV4Cache.crop: the compressor state was not recording (activate_past_recording)")
            fed_kv = torch.cat([kv for kv, _ in self.fed]) if self.fed else None
            n_fed = 0 if fed_kv is None else fed_kv.shape[0]
            if n > n_fed:
                raise ValueError(f"DeepseekV4Cache.crop: cannot remove {n} tokens, only {n_fed} were fed since the last crop")
            base_count, pend_kv, pend_gate, base_okv, base_ogate = self.base
            fed_gate = torch.cat([g for _, g in self.fed])
            if pend_kv is not None and pend_kv.shape[0]:
                fed_kv, fed_gate = torch.cat([pend_kv, fed_kv]), torch.cat([pend_gate, fed_gate])
            m = self.rate
            first = base_count * m  # token index of fed_kv[0]
            end = first + fed_kv.shape[0] - n
            count = end // m
            self.pending_kv, self.pending_gate = fed_kv[count * m - first : end - first], fed_gate[count * m - first : end - first]
            if self.entries is not None:
                self.entries = self.entries[:count]
            if count == base_count:
                self.overlap_kv, self.overlap_gate = base_okv, base_ogate
            elif self.window_overlaps:
                self.overlap_kv, self.overlap_gate = self.window_overlaps[count - base_count - 1]
            self.count = count
        self.mark(recording)


class DeepseekV4Cache(Cache):
    """Cache for DeepSeek-V4 generation: sliding-window K=V plus compressor state per layer.

    ``seen`` counts, per batch row, the real (non-padding) tokens consumed so far, which gives the
    absolute positions of new tokens."""

    is_compileable = False

    def __init__(self, config: DeepseekV4Config):
        super().__init__(layers=[DeepseekV4LayerState(t) for t in config.layer_types])
        self.sliding_window = config.sliding_window
        self.seen: torch.Tensor | None = None  # [B] long
        self.slots = 0  # token slots consumed (real + padding), per row
        self.padded = False  # some row has seen a padding slot
        self.slots_at_mark = 0  # slots when past recording started or at the last crop

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slots

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_linear(self):
        return [False] * len(self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(indices)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, indices.to(self.seen.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen is not None:
            self.batch_select_indices(torch.arange(self.seen.shape[0], device=self.seen.device).repeat_interleave(repeats))

    def reset(self) -> None:
        for i, layer in enumerate(self.layers):
            self.layers[i] = DeepseekV4LayerState(layer.layer_type)
        self.seen, self.slots, self.padded, self.slots_at_mark = None, 0, False, 0

    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """Keep what the next forward calls feed until :meth:`crop`, so they can be rolled back."""
        for layer in self.layers:
            layer.record_past = True
            layer.mark()
        self.slots_at_mark = self.slots

    def is_recording_past(self, layer_idx: int) -> bool:
        return self.layers[layer_idx].record_past

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` token slots (transformers' convention: a negative
        count) fed since past recording started or since the last crop, exactly: sliding keys,
        compressed entries, the compressors' open windows and overlap state, and positions all go
        back to what they were after the earlier token. ``crop(0)`` trims back to the working size."""
        if tokens_to_remove > 0:
            raise ValueError(f"DeepseekV4Cache.crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        slots = -tokens_to_remove
        recording = all(layer.record_past for layer in self.layers)
        if slots and not recording:
            raise RuntimeError("DeepseekV4Cache.crop: call activate_past_recording() before the forward calls to roll back")
        since = self.slots - self.slots_at_mark
        if slots > since:
            raise ValueError(f"DeepseekV4Cache.crop: cannot remove {slots} tokens, only {since} were fed since the last crop")
        real = [0] * (0 if self.seen is None else self.seen.shape[0])
        if slots:
            key_pos = self.layers[0].key_pos
            real_t = (key_pos[:, -slots:] >= 0).sum(-1)
            real = real_t.tolist()
            self.seen = self.seen - real_t.to(self.seen.device)
            self.slots -= slots
        keep = self.sliding_window - 1
        for layer in self.layers:
            layer.crop(slots, real, keep)
        self.slots_at_mark = self.slots


# ----------------------------------------------------------------------------- compressors
def pool_windows(kv, gate, position_bias, prev_kv=None, prev_gate=None, overlap: bool = False):
    """Gated pooling of complete windows. ``kv``/``gate``: [B, W, m, width].

    HCA (``overlap=False``): entry w = sum_j softmax_j(gate + bias) * kv over window w.
    CSA (``overlap=True``, width = 2d): each token carries two series, Ca = [..., :d] feeding the
    *next* window and Cb = [..., d:] feeding its own; entry w pools window w-1's Ca with window w's Cb
    (2m slots). Window 0 takes Ca from ``prev_*`` (the previous call) or gets zero weight."""
    gate = gate + position_bias
    if overlap:
        B, W, m, width = kv.shape
        d = width // 2
        slots_kv = kv.new_zeros((B, W, 2 * m, d))
        slots_gate = gate.new_full((B, W, 2 * m, d), float("-inf"))
        slots_kv[:, :, m:] = kv[..., d:]
        slots_gate[:, :, m:] = gate[..., d:]
        if W > 1:
            slots_kv[:, 1:, :m] = kv[:, :-1, :, :d]
            slots_gate[:, 1:, :m] = gate[:, :-1, :, :d]
        if prev_kv is not None:
            slots_kv[:, 0, :m] = prev_kv.to(slots_kv.dtype)
            slots_gate[:, 0, :m] = prev_gate.to(slots_gate.dtype)
        kv, gate = slots_kv, slots_gate
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    return (kv * weights).sum(dim=2)


class DeepseekV4Compressor(nn.Module):
    """Turns every ``compress_rate`` source tokens into one long-range K=V entry (HCA), or, with
    ``overlap``, into overlapping entries of width 2m and stride m (CSA; also the indexer's keys)."""

    def __init__(self, config: DeepseekV4Config, rate: int, head_dim: int, overlap: bool):
        super().__init__()
        self.compress_rate, self.head_dim, self.overlap = rate, head_dim, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width, dtype=torch.float32))
        self.kv_norm = DeepseekV4RMSNorm(head_dim, eps=config.rms_norm_eps)

    def finish(self, pooled: torch.Tensor, window_index: torch.Tensor, rotary) -> torch.Tensor:
        """Norm and RoPE (at the window's first position) of pooled entries [B, W, d]."""
        compressed = self.kv_norm(pooled)
        cos, sin = rotary(window_index * self.compress_rate, "compress", compressed.dtype)
        return apply_rope(compressed, cos, sin)

    def stateless(self, hidden: torch.Tensor, rotary) -> torch.Tensor:
        """All complete windows of ``hidden`` [B, S, D], no state: entries [B, S // m, d]."""
        B, S, _ = hidden.shape
        m = self.compress_rate
        W = S // m
        if W == 0:
            return hidden.new_zeros((B, 0, self.head_dim))
        kv = self.kv_proj(hidden[:, : W * m]).view(B, W, m, -1)
        gate = self.gate_proj(hidden[:, : W * m]).view(B, W, m, -1)
        pooled = pool_windows(kv, gate, self.position_bias, overlap=self.overlap)
        index = torch.arange(W, device=hidden.device).unsqueeze(0).expand(B, -1)
        return self.finish(pooled, index, rotary)

    def step_row(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorRowState, rotary,
                 record: bool = False) -> torch.Tensor:
        """Feed one row's new projected tokens [L, width]; returns all entries so far [count, d].
        ``record``: keep what is needed to roll this call back (past recording, see the cache)."""
        m = self.compress_rate
        state.rate = m
        new_kv, new_gate = kv, gate
        if state.pending_kv is not None and state.pending_kv.shape[0]:
            kv = torch.cat([state.pending_kv, kv], dim=0)
            gate = torch.cat([state.pending_gate, gate], dim=0)
        W = kv.shape[0] // m
        state.pending_kv, state.pending_gate = kv[W * m :], gate[W * m :]
        window_kv = window_gate = None
        if W > 0:
            kv_w = kv[: W * m].view(1, W, m, -1)
            gate_w = gate[: W * m].view(1, W, m, -1)
            pooled = pool_windows(kv_w, gate_w, self.position_bias, state.overlap_kv, state.overlap_gate, self.overlap)
            if self.overlap:
                # the overlap (Ca) half of every closed window, gate stored with the position bias
                # already added, as pool_windows uses it; the last one feeds the next window
                window_kv = kv_w[0, :, :, : self.head_dim]
                window_gate = gate_w[0, :, :, : self.head_dim] + self.position_bias[:, : self.head_dim]
                state.overlap_kv, state.overlap_gate = window_kv[-1], window_gate[-1]
            index = torch.arange(state.count, state.count + W, device=kv.device).unsqueeze(0)
            new = self.finish(pooled, index, rotary)[0]
            state.entries = new if state.entries is None else torch.cat([state.entries, new], dim=0)
            state.count += W
        if record:
            state.record(new_kv, new_gate, window_kv, window_gate)
        if state.entries is None:
            state.entries = kv.new_zeros((0, self.head_dim))
        return state.entries

    def compress(self, hidden, rotary, ctx: "StepContext", name: str):
        """Entries [B, Nmax, d] and their count per row [B]."""
        if ctx.state is None:
            entries = self.stateless(hidden, rotary)
            counts = torch.full((hidden.shape[0],), entries.shape[1], device=hidden.device, dtype=torch.long)
            return entries, counts
        kv_all, gate_all = self.kv_proj(hidden), self.gate_proj(hidden)
        rows = []
        for b, row_state in enumerate(ctx.state.rows):
            valid = ctx.valid_index[b]
            rows.append(self.step_row(kv_all[b, valid], gate_all[b, valid], row_state[name], rotary, ctx.state.record_past))
        if len(rows) == 1:
            return rows[0].unsqueeze(0), torch.tensor([rows[0].shape[0]], device=hidden.device)
        counts = torch.tensor([r.shape[0] for r in rows], device=hidden.device, dtype=torch.long)
        n_max = int(counts.max()) if len(rows) else 0
        entries = hidden.new_zeros((len(rows), n_max, self.head_dim))
        for b, r in enumerate(rows):
            entries[b, : r.shape[0]] = r
        return entries, counts


class DeepseekV4IndexerScorer(nn.Module):
    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)


class DeepseekV4Indexer(DeepseekV4Compressor):
    """Lightning indexer: its own overlapping compressor at ``index_head_dim`` gives the keys; per
    query the score of entry s is sum_h w_h(x) * relu(q_h . k_s); the top ``index_topk`` causally
    visible entries are kept."""

    def __init__(self, config: DeepseekV4Config):
        rate = config.compress_rates["compressed_sparse_attention"]
        super().__init__(config, rate, config.index_head_dim, overlap=True)
        self.num_heads, self.index_topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.scorer = DeepseekV4IndexerScorer(config)

    def forward(self, hidden, q_residual, visible, rotary, ctx, cos, sin) -> torch.Tensor:
        """Boolean [B, S, N] mask of the entries each query keeps (a subset of ``visible``)."""
        keys, _ = self.compress(hidden, rotary, ctx, "indexer")
        B, S, _ = hidden.shape
        q = self.q_b_proj(q_residual).view(B, S, self.num_heads, self.head_dim)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))  # [B, S, h, N]
        scores = F.relu(scores) * self.head_dim**-0.5
        head_weights = self.scorer.weights_proj(hidden).float() * self.num_heads**-0.5
        scores = (scores * head_weights.unsqueeze(-1)).sum(dim=2)  # [B, S, N]
        keep = torch.zeros_like(visible)
        n = keys.shape[1]
        if n == 0:
            return keep
        # Stable descending sort: equal scores (common, ReLU gives exact zeros) keep the earlier
        # entry, so the choice does not depend on how the sequence was chunked.
        order = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        top = order[..., : min(self.index_topk, n)]
        return keep.scatter_(-1, top, True) & visible


class DeepseekV4CompressorHCA(DeepseekV4Compressor):
    def __init__(self, config):
        super().__init__(config, config.compress_rates["heavily_compressed_attention"], config.head_dim, overlap=False)


class DeepseekV4CompressorCSA(DeepseekV4Compressor):
    def __init__(self, config):
        super().__init__(config, config.compress_rates["compressed_sparse_attention"], config.head_dim, overlap=True)
        self.indexer = DeepseekV4Indexer(config)


# ----------------------------------------------------------------------------- attention
class DeepseekV4GroupedLinear(nn.Module):
    """Block-diagonal projection: each of ``n_groups`` head groups is projected on its own."""

    def __init__(self, in_per_group: int, out_features: int, n_groups: int):
        super().__init__()
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.empty(out_features, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., g, in] -> [..., g, out/g]
        w = self.weight.view(self.n_groups, -1, x.shape[-1])
        return torch.einsum("...gi,goi->...go", x, w)


class StepContext:
    """What every layer needs to know about the tokens of this forward call."""

    def __init__(self, positions, key_valid, state_for_layer, valid_index):
        self.positions = positions  # [B, S] absolute positions of the new tokens
        self.key_valid = key_valid  # [B, S] bool, False for padding
        self.state_for_layer = state_for_layer
        self.valid_index = valid_index  # per row: indices of real tokens (only with a cache)
        self.state = None
        self.sliding_mask = None
        self.no_padding = False  # no padding slot in this call or in the cache: slot distance == position distance


class DeepseekV4Attention(nn.Module):
    """Shared K=V multi-query attention over a sliding window plus compressed long-range entries,
    with per-head sinks, partial interleaved RoPE (undone on the output) and a grouped low-rank
    output projection."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int, layer_type: str | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.layer_type = layer_type or config.layer_types[layer_idx]
        self.rope_label = "main" if self.layer_type == "sliding_attention" else "compress"
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.sliding_window, self.eps = config.sliding_window, config.rms_norm_eps
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = DeepseekV4RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = DeepseekV4RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        in_per_group = self.num_heads * self.head_dim // config.o_groups
        self.o_a_proj = DeepseekV4GroupedLinear(in_per_group, config.o_groups * config.o_lora_rank, config.o_groups)
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        if self.layer_type == "compressed_sparse_attention":
            self.compressor = DeepseekV4CompressorCSA(config)
        elif self.layer_type == "heavily_compressed_attention":
            self.compressor = DeepseekV4CompressorHCA(config)
        else:
            self.compressor = None

    def sliding_keys(self, kv, ctx: StepContext):
        """K=V rows visible to this call ([B, L, d]) and the [B, S, L] sliding-window mask."""
        positions, state = ctx.positions, ctx.state
        key_pos = positions.masked_fill(~ctx.key_valid, -1)
        if state is not None and state.keys is not None:
            keys = torch.cat([state.keys, kv], dim=1)
            key_pos = torch.cat([state.key_pos, key_pos], dim=1)
        else:
            keys = kv
        if state is not None and state.record_past:  # kept whole until crop trims it
            state.keys, state.key_pos = keys, key_pos
        elif state is not None:
            keep = self.sliding_window - 1
            state.keys, state.key_pos = keys[:, -keep:] if keep else keys[:, :0], key_pos[:, -keep:] if keep else key_pos[:, :0]
        # every layer holds the same key positions, so the mask is built once per forward call
        if ctx.sliding_mask is None:
            q_pos, k_pos = positions.unsqueeze(-1), key_pos.unsqueeze(1)
            ctx.sliding_mask = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos > q_pos - self.sliding_window)
        return keys, ctx.sliding_mask

    def _attend(self, q, keys, mask):
        """q [B, s, H, d], shared K=V rows [B, K, d], mask [B, s, K] -> [B, s, H, d]."""
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(1, 2).unsqueeze(1)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        # softmax over [scores | sink]; the sink column only absorbs probability mass
        sinks = self.sinks.view(1, -1, 1, 1).to(scores.dtype)
        peak = torch.maximum(scores.amax(dim=-1, keepdim=True), sinks)
        if torch.is_grad_enabled():
            weights = (scores - peak).exp()
            probs = weights / (weights.sum(dim=-1, keepdim=True) + (sinks - peak).exp())
        else:  # same arithmetic in place (inference)
            weights = scores.sub_(peak).exp_()
            probs = weights.div_(weights.sum(dim=-1, keepdim=True).add_((sinks - peak).exp_()))
        return torch.matmul(probs.to(keys.dtype), keys.unsqueeze(1)).transpose(1, 2)

    def forward(self, hidden, rotary, ctx: StepContext, cos_sin):
        B, S, _ = hidden.shape
        cos, sin = cos_sin[self.rope_label]
        q_residual = self.q_a_norm(self.q_a_proj(hidden))
        q = self.q_b_proj(q_residual).view(B, S, self.num_heads, self.head_dim)
        q = apply_rope(unweighted_rms_norm(q, self.eps), cos.unsqueeze(2), sin.unsqueeze(2))
        kv = apply_rope(self.kv_norm(self.kv_proj(hidden)), cos, sin)

        keys, mask = self.sliding_keys(kv, ctx)
        entries = visible = None
        if self.compressor is not None:
            entries, counts = self.compressor.compress(hidden, rotary, ctx, "compressor")
            m = self.compressor.compress_rate
            index = torch.arange(entries.shape[1], device=hidden.device)
            # entry w summarises positions [w*m, (w+1)*m): visible once the query has reached its end
            visible = (index.view(1, 1, -1) < ((ctx.positions + 1) // m).unsqueeze(-1)) & (
                index.view(1, 1, -1) < counts.view(-1, 1, 1)
            )
            if self.layer_type == "compressed_sparse_attention":
                ccos, csin = cos_sin["compress"]
                visible = self.compressor.indexer(hidden, q_residual, visible, rotary, ctx, ccos, csin)

        # Long inputs attend block by block: a block of W queries only needs the W - 1 key slots
        # before it (slots and positions advance together), so the work is O(S*W), not O(S^2).
        offset, block = keys.shape[1] - S, self.sliding_window
        step = block if (S > 2 * block and ctx.no_padding) else S
        outs = []
        for a in range(0, S, step):
            b = min(S, a + step)
            lo = max(0, a + offset - block + 1)
            k, msk = keys[:, lo : b + offset], mask[:, a:b, lo : b + offset]
            if entries is not None:
                k, msk = torch.cat([k, entries], dim=1), torch.cat([msk, visible[:, a:b]], dim=-1)
            outs.append(self._attend(q[:, a:b], k, msk))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        # K=V carried RoPE into the values: rotate back by the query position (relative positions)
        out = apply_rope(out, cos.unsqueeze(2), -sin.unsqueeze(2))
        out = self.o_a_proj(out.reshape(B, S, self.config.o_groups, -1)).flatten(2)
        return self.o_b_proj(out)


# ----------------------------------------------------------------------------- hyper-connections
class DeepseekV4HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection: from the N residual streams compute ``pre`` (collapse
    the streams into the block input), ``post`` (spread the block output over the streams) and
    ``comb`` (mix the streams; projected onto doubly-stochastic matrices by Sinkhorn-Knopp)."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        n = config.hc_mult
        self.hc_mult, self.iters, self.hc_eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def forward(self, streams: torch.Tensor):
        B, S, n, _ = streams.shape
        mixes = F.linear(unweighted_rms_norm(streams.reshape(B, S, -1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = torch.softmax(comb_w.view(B, S, n, n) * self.scale[2] + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        if not torch.is_grad_enabled():  # same arithmetic, without allocating per iteration
            for _ in range(self.iters - 1):
                comb.div_(comb.sum(dim=-1, keepdim=True).add_(self.hc_eps))
                comb.div_(comb.sum(dim=-2, keepdim=True).add_(self.hc_eps))
        else:
            for _ in range(self.iters - 1):
                comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
                comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed


def hc_merge(streams, block_out, post, comb):
    """streams' = post * block_out + comb^T @ streams (comb mixes over its first axis)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class DeepseekV4HyperHead(nn.Module):
    """Collapse the N streams into one before the final norm."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


# ----------------------------------------------------------------------------- MoE
def score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits.float(), dim=-1).to(logits.dtype)


class DeepseekV4TopKRouter(nn.Module):
    """Learned routing: top-k of score + e_score_correction_bias (the bias only picks experts; the
    weights come from the unbiased scores)."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def select(self, scores: torch.Tensor, input_ids) -> torch.Tensor:
        return torch.topk(scores + self.e_score_correction_bias, self.config.num_experts_per_tok, dim=-1, sorted=False).indices

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None):
        logits = F.linear(hidden, self.weight)
        scores = score(logits, self.config.scoring_func)
        indices = self.select(scores, input_ids)
        weights = scores.gather(1, indices)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.config.routed_scaling_factor, indices


class DeepseekV4HashRouter(DeepseekV4TopKRouter):
    """Hash routing: the experts of a token are a fixed table lookup ``tid2eid[token_id]``."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config)
        del self.e_score_correction_bias
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok, dtype=torch.long))

    def select(self, scores, input_ids):
        if input_ids is None:
            raise ValueError("hash-routed MoE layers need input_ids (inputs_embeds alone cannot be routed)")
        return self.tid2eid[input_ids.reshape(-1)].long()


class DeepseekV4Experts(nn.Module):
    """Routed experts as stacked tensors: gate_up_proj [E, 2I, D] (w1 rows then w3 rows), down_proj [E, D, I]."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.num_experts, self.limit = config.n_routed_experts, config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(config.n_routed_experts, 2 * config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size))
        self.backend = "reference"

    def forward(self, hidden, top_k_index, top_k_weights):
        return MOE_BACKENDS[self.backend](self, hidden, top_k_index, top_k_weights)


class DeepseekV4MLP(nn.Module):
    """The shared expert (same clamped SwiGLU as the routed experts)."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        self.limit = config.swiglu_limit
        self.gate_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x).clamp(max=self.limit)) * self.up_proj(x).clamp(-self.limit, self.limit))


class DeepseekV4SparseMoeBlock(nn.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int, mlp_type: str | None = None):
        super().__init__()
        self.is_hash = (mlp_type or config.mlp_layer_types[layer_idx]) == "hash_moe"
        self.gate = DeepseekV4HashRouter(config) if self.is_hash else DeepseekV4TopKRouter(config)
        self.experts = DeepseekV4Experts(config)
        self.shared_experts = DeepseekV4MLP(config)
        self.last_expert_load: torch.Tensor | None = None  # tokens per expert of the last call (training health)

    def forward(self, hidden, input_ids=None):
        B, S, D = hidden.shape
        flat = hidden.reshape(-1, D)
        _, weights, indices = self.gate(flat, input_ids)
        if self.training:
            self.last_expert_load = torch.bincount(indices.reshape(-1), minlength=self.experts.num_experts).detach()
        routed = self.experts(flat, indices, weights.to(flat.dtype)).view(B, S, D)
        return routed + self.shared_experts(hidden)


# ----------------------------------------------------------------------------- layers and models
class DeepseekV4DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV4Config, layer_idx: int, layer_type: str | None = None, mlp_type: str | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DeepseekV4Attention(config, layer_idx, layer_type)
        self.mlp = DeepseekV4SparseMoeBlock(config, layer_idx, mlp_type)
        self.input_layernorm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = DeepseekV4HyperConnection(config)
        self.ffn_hc = DeepseekV4HyperConnection(config)

    def forward(self, streams, input_ids=None, rotary=None, ctx=None, cos_sin=None):
        ctx.state = ctx.state_for_layer(self.layer_idx)
        post, comb, collapsed = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(collapsed), rotary, ctx, cos_sin)
        streams = hc_merge(streams, attn, post, comb)
        post, comb, collapsed = self.ffn_hc(streams)
        mlp = self.mlp(self.post_attention_layernorm(collapsed), input_ids)
        return hc_merge(streams, mlp, post, comb)


class DeepseekV4MTPLayer(DeepseekV4DecoderLayer):
    """Next-n (MTP) predictor: from the main model's streams at position t and the embedding of
    token t+1 it predicts token t+2 through one sliding-attention MoE block with its own hyper-head
    and final norm (the LM head is shared). Loaded when ``config.use_mtp``; generation ignores it."""

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config, layer_idx=-1, layer_type="sliding_attention", mlp_type="moe")
        d = config.hidden_size
        self.enorm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.hc_head = DeepseekV4HyperHead(config)
        self.norm = DeepseekV4RMSNorm(d, eps=config.rms_norm_eps)

    def predict(self, streams, next_embeds, next_ids, rotary, positions):
        """streams [B, S, N, D] at positions t, next_embeds [B, S, D] of tokens t+1 -> (hidden [B, S, D]
        for the LM head, output streams for a further depth)."""
        x = self.e_proj(self.enorm(next_embeds)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        ctx = StepContext(positions, torch.ones_like(positions, dtype=torch.bool), lambda i: None, None)
        cos_sin = {label: rotary(positions, label, x.dtype) for label in ("main", "compress")}
        x = super().forward(x, input_ids=next_ids, rotary=rotary, ctx=ctx, cos_sin=cos_sin)
        return self.norm(self.hc_head(x)), x


class DeepseekV4PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV4Config
    config: DeepseekV4Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV4DecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _is_stateful = False  # the cache rolls back exactly (crop), so assisted generation works
    _keep_in_fp32_modules_strict = [
        "attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias",
        "q_a_norm", "kv_norm", "input_layernorm", "post_attention_layernorm", "norm",
    ]
    # MTP tensors are read by checkpoint_deepseek_v4.load_mtp (transformers' renames do not fit them)
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)mtp\..*"]
    _keys_to_ignore_on_load_missing = [r"(^|\.)mtp\..*"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own DeepseekV4Cache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets our cache up front (assisted decoding needs one before the first forward)."""
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None and generation_config.use_cache:
            model_kwargs["cache"] = DeepseekV4Cache(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, DeepseekV4RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, DeepseekV4GroupedLinear):
            module.weight.normal_(0.0, std)
        elif isinstance(module, DeepseekV4TopKRouter):
            module.weight.normal_(0.0, std)
            if isinstance(module, DeepseekV4HashRouter):
                # a deterministic spread of token ids over experts; trained checkpoints ship their own table
                vocab, k = module.tid2eid.shape
                n_experts = self.config.n_routed_experts
                first = (torch.arange(vocab) * 2654435761 % (2**31)) % n_experts
                module.tid2eid.copy_((first.unsqueeze(1) + torch.arange(k)) % n_experts)
            else:
                module.e_score_correction_bias.zero_()
        elif isinstance(module, DeepseekV4Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, DeepseekV4Attention):
            module.sinks.zero_()
        elif isinstance(module, DeepseekV4HyperConnection):
            module.fn.normal_(0.0, std)
            module.base.zero_()
            module.scale.fill_(1.0)
        elif isinstance(module, DeepseekV4HyperHead):
            module.hc_fn.normal_(0.0, std)
            module.hc_base.zero_()
            module.hc_scale.fill_(1.0)
        elif isinstance(module, DeepseekV4Compressor):
            module.position_bias.zero_()
        elif isinstance(module, DeepseekV4RotaryEmbedding):
            for label in module.labels:
                getattr(module, f"{label}_inv_freq").copy_(rope_inv_freq(self.config.rope_parameters[label], self.config.head_dim))

    def set_moe_backend(self, name: str) -> str:
        """Select the routed-expert implementation (``auto``, ``reference``, ``cpu_grouped``, ``triton``, ``cuda``)."""
        device = next(self.parameters()).device
        resolved = resolve_backend(name, device)
        self.config.moe_backend = name
        for module in self.modules():
            if isinstance(module, DeepseekV4Experts):
                module.backend = resolved
        return resolved

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, moe_backend: str | None = None, verify_manifest: bool = False, **kwargs):
        """transformers' loader plus: ``moe_backend`` selection, strict checks that every tensor of the
        checkpoint matched (missing / unexpected / wrong shape -> ValueError naming the tensor), and
        optional verification of a signed release manifest before any weight is read. Quantized
        checkpoints (config.json with ``quantization_config``) go through ``dsv41.quantization``;
        there ``quantized_experts="auto" | "keep" | "dequantize"`` chooses whether FP8 / FP4 routed
        experts stay quantized (auto: when the MoE backend reads them, i.e. Triton on GPU)."""
        from .checkpoint_deepseek_v4 import strict_load

        return strict_load(super().from_pretrained, cls, pretrained_model_name_or_path, args, kwargs, moe_backend, verify_manifest)

    def save_pretrained(self, save_directory, *args, naming: str = "official", **kwargs):
        """Save self-contained: official tensor names (default; ``naming="transformers"`` keeps the
        in-memory names), sharded safetensors with an index, config with ``auto_map`` and the
        modeling source files next to the weights."""
        from .checkpoint_deepseek_v4 import save_checkpoint

        return save_checkpoint(self, save_directory, naming=naming, **kwargs)


class DeepseekV4Model(DeepseekV4PreTrainedModel):
    def __init__(self, config: DeepseekV4Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DeepseekV4DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV4RotaryEmbedding(config)
        self.hc_head = DeepseekV4HyperHead(config)
        if config.use_mtp and config.num_nextn_predict_layers > 0:
            self.mtp = nn.ModuleList([DeepseekV4MTPLayer(config) for _ in range(config.num_nextn_predict_layers)])
        self.gradient_checkpointing = False
        self.post_init()
        self.set_moe_backend(config.moe_backend)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _step_context(self, batch, seq, device, attention_mask, position_ids, cache):
        """Positions and validity of the new tokens; with a cache also each row's real-token indices."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, seq] (1 = token, 0 = padding); got shape {tuple(attention_mask.shape)}")
        new_mask = attention_mask[:, -seq:].bool() if attention_mask is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
        if cache is not None and cache.seen is None:
            cache.seen = torch.zeros(batch, dtype=torch.long, device=device)
        if position_ids is None:
            start = cache.seen.view(-1, 1) if cache is not None else 0
            position_ids = (start + new_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        valid_index = None
        if cache is not None:
            valid_index = [row.nonzero().squeeze(-1) for row in new_mask]
            cache.seen = cache.seen + new_mask.long().sum(-1)
            cache.slots += seq
            for layer in cache.layers:
                if layer.rows is None:
                    layer.rows = [{"compressor": CompressorRowState(), "indexer": CompressorRowState()} for _ in range(batch)]
                    layer.mark()
        elif not bool(new_mask.all()):
            # Padding without a cache: run as a one-shot cached call so compression windows follow
            # each row's own positions (the result is identical to a stateless call on unpadded rows).
            return self._step_context(batch, seq, device, attention_mask, position_ids, DeepseekV4Cache(self.config))
        state_for_layer = (lambda i: cache.layers[i]) if cache is not None else (lambda i: None)
        ctx = StepContext(position_ids, new_mask, state_for_layer, valid_index)
        padded = not bool(new_mask.all())
        if cache is not None:
            cache.padded = cache.padded or padded
            padded = cache.padded
        ctx.no_padding = not padded
        return ctx

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, use_cache=None, past_key_values=None, return_streams=False, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DeepseekV4Cache(self.config)
        if input_ids is not None:
            if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
                bad = input_ids[(input_ids >= self.config.vocab_size) | (input_ids < 0)][0].item()
                raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
            inputs_embeds = self.embed_tokens(input_ids)
        B, S, _ = inputs_embeds.shape
        ctx = self._step_context(B, S, inputs_embeds.device, attention_mask, position_ids, cache)
        cos_sin = {label: self.rotary_emb(ctx.positions, label, inputs_embeds.dtype) for label in ("main", "compress")}
        streams = inputs_embeds.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, input_ids=input_ids, rotary=self.rotary_emb, ctx=ctx, cos_sin=cos_sin)
        hidden = self.norm(self.hc_head(streams))
        out = MoeModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache if use_cache else None})
        self._last_streams, self._last_positions = (streams, ctx.positions) if return_streams else (None, None)
        return out


class DeepseekV4ForCausalLM(DeepseekV4PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV4Config):
        super().__init__(config)
        self.model = DeepseekV4Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def mtp_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each MTP depth k = 1..num_nextn_predict_layers: depth k at position t predicts
        token t+1+k. Returns one [B, S-k, V] tensor per depth."""
        if getattr(self.model, "mtp", None) is None:
            raise ValueError("this model has no MTP layers (load with from_pretrained(..., use_mtp=True))")
        self.model(input_ids=input_ids, use_cache=False, return_streams=True)
        streams, positions = self.model._last_streams, self.model._last_positions
        self.model._last_streams = self.model._last_positions = None
        logits = []
        for depth, layer in enumerate(self.model.mtp, start=1):
            next_ids = input_ids[:, depth:]
            n = next_ids.shape[1]
            hidden, streams = layer.predict(streams[:, :n], self.model.embed_tokens(next_ids), next_ids, self.model.rotary_emb, positions[:, :n])
            logits.append(self.lm_head(hidden))
        return logits

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["DeepseekV4PreTrainedModel", "DeepseekV4Model", "DeepseekV4ForCausalLM", "DeepseekV4Cache"]
