"""The doctor runner: the doctor LM with its own paged KV cache, stepped once per engine step.

Each guided request owns one *stream* per doctor (two for a LoRA doctor under the delta
rule: adapter on and adapter off). A step feeds every stream only the tokens it gained since
its last step, and returns each stream's next-token log-probabilities. The new tokens of all
streams are packed end to end (no padding: a long prompt chunk next to many decodes costs the
sum of their tokens) and run in passes of bounded size (see :mod:`llmdoctor_vllm.packing`). Keys and values live in a block pool sized by a token budget, so memory
follows the tokens actually cached, and a finished request's blocks go back to the pool.

The forward is written out for the Llama family of decoders (Llama, Qwen2, Qwen3, Mistral):
the module's own weights, norms, rotary embedding and MLP, with attention over the pool.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmdoctor_vllm.packing import StepPass, TileGroup, plan_step



class DoctorCacheFull(RuntimeError):
    """The doctor's KV budget cannot hold these streams; they are listed in ``streams``."""

    def __init__(self, streams: list[int], budget_tokens: int):
        super().__init__(f"llmdoctor: doctor KV cache full ({budget_tokens} tokens) for {len(streams)} stream(s)")
        self.streams = streams


@dataclass
class _Decoder:
    """The pieces of a Llama-family causal LM the runner drives."""

    embed: torch.nn.Module
    layers: list
    norm: torch.nn.Module
    rotary: torch.nn.Module
    lm_head: torch.nn.Module
    apply_rope: callable
    lora: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused: list | None = None  # full doctors: per layer (qkv weight, qkv bias, gate_up weight)


def _unwrap(model) -> _Decoder:
    lora = hasattr(model, "peft_config")
    lm = model.get_base_model() if lora else model
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        raise ValueError(f"llmdoctor: unsupported doctor architecture {type(lm).__name__} (Llama-family decoders only)")
    attn = layers[0].self_attn
    cfg = lm.config
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise ValueError("llmdoctor: doctors with sliding-window attention are not supported")
    head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    module = sys.modules[type(attn).__module__]
    fused = None
    if not lora and all(hasattr(layer.mlp, "gate_proj") for layer in layers):
        fused = []
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj])
            gate_up_w, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            fused.append((qkv_w, qkv_b, gate_up_w))
    return _Decoder(
        embed=inner.embed_tokens,
        layers=list(layers),
        norm=inner.norm,
        rotary=inner.rotary_emb,
        lm_head=lm.lm_head,
        apply_rope=module.apply_rotary_pos_emb,
        lora=lora,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        fused=fused,
    )


def _norm(module, x):
    """RMSNorm in one fused call when the module is a plain RMSNorm (as in Llama / Qwen)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        return module(x)
    return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _fuse(mods: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears reading the same input; the originals become views."""
    weight = torch.cat([m.weight.data for m in mods])
    bias = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


def _lora_name(module) -> str:
    """The one active plain-LoRA adapter of a peft layer (what running it on and off per row needs)."""
    active = module.active_adapters
    name = active[0] if len(active) == 1 else None
    if (name is None or name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or module.merged or module.disable_adapters):
        raise ValueError("llmdoctor: the delta rule runs a LoRA doctor with its adapter on and off in one batch, "
                         f"which needs plain LoRA layers (one active adapter, no DoRA, not merged): {module!r}")
    return name


def _linear(module, x, on_rows):
    """Calls a (possibly LoRA-wrapped) linear layer; with ``on_rows`` (row indices of ``x``), the
    adapter applies to those rows only and the others run the base weights (the delta rule's
    reference). One base matmul for all rows plus the low-rank term for the adapter rows: peft's
    own mixed-adapter batch splits every layer by adapter (1.7-3x slower on an H100).
    """
    if on_rows is None or not hasattr(module, "lora_A"):
        return module(x)
    name = _lora_name(module)
    out = module.base_layer(x)
    lora_a = module.lora_A[name]
    xa = module.lora_dropout[name](x.index_select(0, on_rows).to(lora_a.weight.dtype))
    delta = module.lora_B[name](lora_a(xa)) * module.scaling[name]
    return out.index_add_(0, on_rows, delta.to(out.dtype))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host sync: on CUDA through (cached) pinned memory and a
    non-blocking copy, as vLLM's own per-step index tensors go."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def layer_queries(d: _Decoder, li: int, layer, h, cos, sin, pool, write, lin):
    """Layer ``li`` on hidden states ``h`` ``[T, hidden]``: writes the tokens' rotated keys and values to
    ``pool`` (``[2, rows, kv_heads, head_dim]``) at rows ``write``; returns the rotated queries
    ``[T, heads, head_dim]``. ``lin(module, x)`` runs a (possibly LoRA) projection."""
    attn, T = layer.self_attn, h.shape[0]
    nq, nkv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    x = _norm(layer.input_layernorm, h)
    if d.fused is not None:
        q, k, v = F.linear(x, d.fused[li][0], d.fused[li][1]).split([nq, nkv, nkv], dim=-1)
    else:
        q, k, v = lin(attn.q_proj, x), lin(attn.k_proj, x), lin(attn.v_proj, x)
    q = q.reshape(T, d.num_heads, d.head_dim)
    k = k.reshape(T, d.num_kv_heads, d.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k = d.apply_rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    pool[0].index_copy_(0, write, k[0].transpose(0, 1))
    pool[1].index_copy_(0, write, v.reshape(T, d.num_kv_heads, d.head_dim))
    return q[0].transpose(0, 1)


def layer_mlp(d: _Decoder, li: int, layer, h, lin):
    """Layer ``li``'s MLP branch on ``h`` (after its norm), to be added to ``h``."""
    x = _norm(layer.post_attention_layernorm, h)
    mlp = layer.mlp
    if d.fused is not None:
        gate, up = F.linear(x, d.fused[li][2]).chunk(2, dim=-1)
        return F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight)
    if not d.lora:
        return mlp(x)
    return lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, x)) * lin(mlp.up_proj, x))


# Keys are read in lengths rounded up to this many tokens on CUDA: SDPA's cuDNN backend plans per
# shape, and an exact key length grows by one every step (measured on an H100: 1.4 ms of host
# time per layer per step, re-planning). Rounded, a plan serves this many steps.
_CUDA_KEY_BUCKET = 256


def _as_ids(tokens) -> tuple[np.ndarray, np.ndarray | torch.Tensor]:
    """``(counts, flat ids)`` from a list of token sequences, or a ``(counts, ids)`` pair as given."""
    if isinstance(tokens, tuple):
        counts, ids = tokens
        return np.asarray(counts, dtype=np.int64), ids
    counts = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    return counts, np.fromiter((t for row in tokens for t in row), dtype=np.int64, count=int(counts.sum()))


class DoctorRunner:
    """Steps one doctor LM over many streams with an incremental, paged KV cache.

    ``cache_tokens`` is the KV budget (in tokens, over all streams); ``max_streams`` the most
    streams alive at once; ``max_len`` the longest stream. ``max_pass_tokens`` bounds the tokens
    of one forward (a longer feed, such as a long prompt, runs as several passes), and
    ``score_budget`` the attention scores held at once, so the step's activation memory does not
    grow with the prompt length.
    """

    def __init__(self, model, *, device, dtype, cache_tokens: int, max_streams: int, max_len: int,
                 block_size: int = 16, max_pass_tokens: int = 2048, q_tile: int = 256, score_budget: int = 1 << 25):
        self.model = model
        self.dec = _unwrap(model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = max(1, cache_tokens // block_size)
        self.budget_tokens = self.num_blocks * block_size
        self.max_pass_tokens, self.q_tile, self.score_budget = max_pass_tokens, q_tile, score_budget
        nl, kvh, hd = len(self.dec.layers), self.dec.num_kv_heads, self.dec.head_dim
        # the pool, plus one spare row that padded rows of a static step write to and read
        self.kv = torch.zeros((nl, 2, self.budget_tokens + 1, kvh, hd), device=self.device, dtype=dtype)
        self.spare_row = self.budget_tokens
        self.max_blocks_per_stream = -(-max_len // block_size)
        self.block_table = np.zeros((max_streams, self.max_blocks_per_stream), dtype=np.int64)
        self.num_stream_blocks = np.zeros(max_streams, dtype=np.int64)
        self.lengths = np.zeros(max_streams, dtype=np.int64)  # tokens cached per stream
        hidden = self.dec.embed.weight.shape[1]
        # each stream's last hidden state: a stream with no new tokens in a step reuses it
        self.last_hidden = torch.zeros((max_streams, hidden), device=self.device, dtype=dtype)
        self.free_streams = list(range(max_streams - 1, -1, -1))
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.vocab_width = self.dec.lm_head.weight.shape[0]
        with torch.inference_mode():  # rotary tables for every position, looked up per step
            probe = torch.zeros(1, device=self.device, dtype=dtype)
            cos, sin = self.dec.rotary(probe, torch.arange(max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]
        self.key_bucket = _CUDA_KEY_BUCKET if self.device.type == "cuda" else 1
        self.static = None  # decode-only steps in static buckets (see enable_static_decode)

    def enable_static_decode(self, *, max_batch: int, capture: bool, key_start: int = 256) -> None:
        """Runs decode-only steps over static padded buffers (captured as CUDA graphs if ``capture``
        and on CUDA); other steps stay eager. See :mod:`llmdoctor_vllm.decode_graphs`."""
        from llmdoctor_vllm.decode_graphs import StaticDecode

        self.static = StaticDecode(self, max_batch=max_batch, capture=capture, key_start=key_start)

    @property
    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def occupancy(self) -> tuple[int, int]:
        """``(live streams, blocks in use)``: both return to zero when no request is guided."""
        return (len(self.block_table) - len(self.free_streams), self.num_blocks - len(self.free_blocks))

    def new_stream(self) -> int:
        """An empty stream id (its cache starts clean)."""
        if not self.free_streams:
            raise DoctorCacheFull([], self.budget_tokens)
        sid = self.free_streams.pop()
        self.lengths[sid] = 0
        self.num_stream_blocks[sid] = 0
        return sid

    def free_stream(self, sid: int) -> None:
        """Gives the stream's blocks back to the pool."""
        nb = int(self.num_stream_blocks[sid])
        self.free_blocks.extend(self.block_table[sid, :nb].tolist())
        self.num_stream_blocks[sid] = 0
        self.lengths[sid] = 0
        self.free_streams.append(sid)

    def _reserve(self, sids: np.ndarray, totals: np.ndarray) -> None:
        need = -(-totals // self.block_size) - self.num_stream_blocks[sids]
        short = sids[(need > 0) & (totals > self.max_blocks_per_stream * self.block_size)]
        if len(short) or need.clip(min=0).sum() > len(self.free_blocks):
            # Say which streams would not fit; the caller drops their guidance.
            over = short if len(short) else sids[need > 0]
            raise DoctorCacheFull(over.tolist(), self.budget_tokens)
        for s, k in zip(sids[need > 0].tolist(), need[need > 0].tolist()):
            start = self.num_stream_blocks[s]
            self.block_table[s, start:start + k] = self.free_blocks[len(self.free_blocks) - k:][::-1]
            del self.free_blocks[len(self.free_blocks) - k:]
            self.num_stream_blocks[s] = start + k

    @torch.inference_mode()
    def step(self, sids: np.ndarray, tokens, adapter_off: np.ndarray | None = None) -> torch.Tensor:
        """Feeds each stream its new tokens; returns ``[len(sids), vocab]`` float32 log-probs.

        ``tokens`` is either a list (one sequence of new token ids per stream) or a pair
        ``(counts, ids)``: ``counts[i]`` new tokens for stream ``sids[i]``, ``ids`` all of them
        end to end (a host array or a tensor on the doctor's device). A stream may gain no token
        (its last distribution is returned again). ``adapter_off[i]`` runs that stream with the
        LoRA adapter switched off.
        """
        sids = np.asarray(sids, dtype=np.int64)
        counts, ids = _as_ids(tokens)
        cached = self.lengths[sids]
        totals = cached + counts
        self._reserve(sids, totals)
        lora_off = adapter_off if self.dec.lora and adapter_off is not None and adapter_off.any() else None
        if self.static is not None and len(sids) and (counts == 1).all():
            key = self.static.bucket(len(sids), int(totals.max()))
            if key is not None:
                out = self.static.step(sids, ids, totals, lora_off, key)
                self.lengths[sids] = totals
                return out
        dev = self.device
        plan = plan_step(counts, cached, self.block_table[sids], self.block_size, max_pass_tokens=self.max_pass_tokens,
                         q_tile=self.q_tile, score_budget=self.score_budget, num_heads=self.dec.num_heads,
                         key_bucket=self.key_bucket)
        if len(plan.src):
            ids = torch.as_tensor(ids).to(dev, non_blocking=True)
            ids = ids[to_device(plan.src, dev)].long()
        for p in plan.passes:
            tok_on = None if lora_off is None else np.flatnonzero(~lora_off[plan.stream[p.start:p.end]])
            h = self._forward_pass(p, ids[p.start:p.end], plan.pos[p.start:p.end], plan.write[p.start:p.end],
                                   None if tok_on is None else to_device(tok_on, dev))
            rows = to_device(sids[p.last_stream], dev)
            self.last_hidden.index_copy_(0, rows, h.index_select(0, to_device(p.last_token, dev)))
        self.lengths[sids] = totals
        on_rows = None if lora_off is None else to_device(np.flatnonzero(~lora_off), dev)
        last = self.last_hidden.index_select(0, to_device(sids, dev))
        logits = _linear(self.dec.lm_head, _norm(self.dec.norm, last), on_rows)
        return torch.log_softmax(logits.float(), dim=-1)

    def _forward_pass(self, p: StepPass, ids: torch.Tensor, pos: np.ndarray, write: np.ndarray, on_rows):
        """The decoder over one pass's packed tokens; returns their last hidden states ``[P, hidden]``."""
        d, dev = self.dec, self.device
        P = p.end - p.start
        pos_t = to_device(pos, dev)
        write_t = to_device(write, dev)
        groups = [_GroupTensors.of(g, dev) for g in p.groups]
        h = d.embed(ids)
        cos, sin = self.cos[pos_t][None], self.sin[pos_t][None]
        nq = d.num_heads * d.head_dim

        def lin(module, x):
            return _linear(module, x, on_rows)

        for li, layer in enumerate(d.layers):
            attn = layer.self_attn
            q = layer_queries(d, li, layer, h, cos, sin, self.kv[li], write_t, lin)  # [P, heads, hd]
            pool_k, pool_v = self.kv[li, 0], self.kv[li, 1]
            o = q.new_empty((P, nq)) if not (len(groups) == 1 and groups[0].identity) else None
            for g in groups:
                out = self._attend(g, q, pool_k, pool_v, attn.scaling)
                if g.identity:
                    o = out[:, 0]
                else:
                    o[g.scatter_to] = out[g.valid]
            h = h + _linear(attn.o_proj, o, on_rows)
            h = h + layer_mlp(d, li, layer, h, lin)
        return h

    def _attend(self, g: "_GroupTensors", q: torch.Tensor, pool_k, pool_v, scale) -> torch.Tensor:
        """Attention of one tile group over the pool: ``[G, Q, heads * head_dim]``."""
        d = self.dec
        G, L = g.read.shape
        # [G, heads, Q, hd]; a decode-only pass is already one query per tile, in order
        qg = q[:, :, None, :] if g.identity else q[g.q_index].transpose(1, 2)
        rows = g.read.reshape(-1)
        keys = pool_k.index_select(0, rows).view(G, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
        vals = pool_v.index_select(0, rows).view(G, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask, scale=scale,
                                           enable_gqa=d.num_heads != d.num_kv_heads)
        return o.transpose(1, 2).reshape(G, qg.shape[2], -1)


@dataclass
class _GroupTensors:
    """A :class:`TileGroup` on the device: query gather/scatter indices, key rows, causal mask."""

    q_index: torch.Tensor
    valid: torch.Tensor
    scatter_to: torch.Tensor
    read: torch.Tensor
    mask: torch.Tensor  # [G, 1, Q, L]: a query sees keys at positions up to its own
    identity: bool

    @classmethod
    def of(cls, g: TileGroup, dev) -> "_GroupTensors":
        L = g.read.shape[1]
        mask = to_device(np.arange(L)[None, None, :] <= g.q_pos[:, :, None], dev)[:, None]
        return cls(q_index=to_device(g.q_index, dev), valid=to_device(g.q_valid, dev),
                   scatter_to=to_device(g.q_index[g.q_valid], dev),
                   read=to_device(g.read, dev), mask=mask, identity=g.identity)
