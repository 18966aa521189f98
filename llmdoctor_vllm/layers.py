"""The doctor's layer math for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral).

:func:`unwrap_decoder` reads a transformers causal LM (or a peft LoRA model around one) into a
:class:`Decoder`: per layer, the projections that read the same input fused into one matmul
(q/k/v, gate/up), with their LoRA factors stacked (A) and block-diagonal (B, scaling folded in),
so a layer is a handful of large ops whatever the adapter. The fused weights are the originals'
storage: the model's own modules become views of them and keep working. The packed runner
(:mod:`llmdoctor_vllm.runner`) and the static decode step (:mod:`llmdoctor_vllm.decode_graphs`)
both run their layers through :func:`forward_layers`, each with its own attention and rotation.

On CPU, the doctor runs on the kernels vLLM's CPU build runs the patient with: oneDNN matmuls over
prepacked weights (for a LoRA doctor, the base weights merged with the adapter), the fused
residual-add RMSNorm, SiLU-and-mul and rotary embedding. The prepacked copies cost one more copy
of the doctor's weights in host memory.

A projection runs its LoRA adapter on every row (``on=None``) or scaled per row by a 0/1 factor
(``on`` a float ``[T, 1]`` tensor: 0 on the delta rule's reference rows, which run the base weights).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _vllm_cpu_ops():
    """vLLM's CPU kernels (oneDNN matmul, fused norms), or ``None`` where this build lacks them."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    ok = getattr(ops, "_supports_onednn", False) and all(
        hasattr(torch.ops._C, n) for n in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"))
    return ops if ok else None


def lora_name(module) -> str:
    """The one active plain-LoRA adapter of a peft layer (what running it on and off per row needs)."""
    active = module.active_adapters
    name = active[0] if len(active) == 1 else None
    if (name is None or name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or module.merged or module.disable_adapters):
        raise ValueError("llmdoctor: the delta rule runs a LoRA doctor with its adapter on and off in one batch, "
                         f"which needs plain LoRA layers (one active adapter, no DoRA, not merged): {module!r}")
    return name


def has_lora(module) -> bool:
    """Whether ``module`` holds any LoRA layer."""
    return any(hasattr(m, "lora_A") for m in module.modules())


def _plain_lora(module) -> bool:
    try:
        lora_name(module)
    except ValueError:
        return False
    return True


def _module_linear(module, x, on):
    """A (possibly LoRA-wrapped) linear module with its adapter per row as ``on`` says."""
    if on is None or not hasattr(module, "lora_A"):
        return module(x)
    name = lora_name(module)
    out = module.base_layer(x)
    lora_a = module.lora_A[name]
    delta = module.lora_B[name](lora_a(x.to(lora_a.weight.dtype)))
    return out + (delta * module.scaling[name] * on).to(out.dtype)


@dataclass
class Proj:
    """One projection, or several reading the same input fused into one.

    ``weight`` ``[out, in]`` (and ``bias``) is the base; ``lora_a`` ``[R, in]`` and ``lora_bt``
    ``[R, out]`` (B transposed, scaling folded in) the adapter's low-rank term, if any. With
    ``packed`` (a oneDNN matmul of vLLM's CPU build) the product runs over a prepacked copy of the
    weights merged with the adapter, and rows with the adapter off subtract its term. A
    projection the fused form cannot express (a DoRA or multi-adapter layer) keeps its
    ``modules`` and calls them one by one.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_bt: torch.Tensor | None = None
    modules: list | None = None
    packed: object = None
    mm: object = None  # the kernel that multiplies by ``packed`` (vLLM's ``onednn_mm``)

    def __call__(self, x: torch.Tensor, on: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[T, in]`` -> ``[T, out]``, the adapter per row as ``on`` says (see the module doc)."""
        if self.modules is not None:
            outs = [_module_linear(m, x, on) for m in self.modules]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.packed is not None:
            out = self.mm(self.packed, x, self.bias)
            if self.lora_a is None or on is None:
                return out
            return out.addmm_(F.linear(x, self.lora_a) * (on - 1), self.lora_bt)
        out = F.linear(x, self.weight, self.bias)
        if self.lora_a is None:
            return out
        xa = F.linear(x, self.lora_a)
        return out.addmm_(xa if on is None else xa * on, self.lora_bt)

    def pack(self, ops) -> None:
        """Prepacks the (merged) weights for ``ops.onednn_mm``."""
        if self.modules is not None or self.weight.device.type != "cpu":
            return
        merged = self.weight if self.lora_a is None else self.weight + self.lora_bt.t() @ self.lora_a
        self.packed, self.mm = ops.create_onednn_mm(merged.t(), 32), ops.onednn_mm


def _fuse(modules: list) -> Proj:
    """One :class:`Proj` for linears (plain or plain-LoRA) reading the same input. The base weights
    are concatenated once and the modules' own weights become views of the result."""
    bases = [m.base_layer if hasattr(m, "lora_A") else m for m in modules]
    if any(hasattr(m, "lora_A") and not _plain_lora(m) for m in modules) or \
            any(not isinstance(b, torch.nn.Linear) for b in bases):
        return Proj(None, modules=list(modules))
    if len(bases) == 1:
        weight, bias = bases[0].weight.data, None if bases[0].bias is None else bases[0].bias.data
    else:
        weight = torch.cat([b.weight.data for b in bases])
        has_bias = [b.bias is not None for b in bases]
        bias = torch.cat([b.bias.data if b.bias is not None else b.weight.new_zeros(b.weight.shape[0])
                          for b in bases]) if any(has_bias) else None
        start = 0
        for b in bases:
            n = b.weight.shape[0]
            b.weight.data = weight[start:start + n]
            if b.bias is not None:
                b.bias.data = bias[start:start + n]
            start += n
    if not any(hasattr(m, "lora_A") for m in modules):
        return Proj(weight, bias)
    a_parts, b_parts = [], []
    for m, b in zip(modules, bases):
        if hasattr(m, "lora_A"):
            name = lora_name(m)
            a_parts.append(m.lora_A[name].weight.data.to(weight.dtype))
            b_parts.append((m.lora_B[name].weight.data * m.scaling[name]).to(weight.dtype))
        else:
            a_parts.append(weight.new_zeros((0, weight.shape[1])))
            b_parts.append(weight.new_zeros((b.weight.shape[0], 0)))
    return Proj(weight, bias, torch.cat(a_parts), torch.block_diag(*b_parts).t().contiguous())


@dataclass
class Layer:
    """One decoder layer's pieces in fused form."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_norm: torch.nn.Module | None  # Qwen3's per-head norms
    k_norm: torch.nn.Module | None
    qkv: Proj
    o: Proj
    gate_up: Proj | None  # None: an MLP of another shape, run as its module (no per-row adapter)
    down: Proj | None
    mlp: torch.nn.Module
    silu: bool  # the MLP's activation is SiLU
    scaling: float


@dataclass
class Decoder:
    """The pieces of a Llama-family causal LM the runner drives."""

    embed: torch.nn.Module
    layers: list[Layer]
    norm: torch.nn.Module
    rotary: torch.nn.Module
    lm_head: Proj
    lora: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cpu_ops: object = None  # vLLM's CPU kernels, where the doctor runs on them

    @property
    def vocab_rows(self) -> int:
        """Token ids the embedding can look up: ``0 .. vocab_rows - 1``."""
        return self.embed.weight.shape[0]


def unwrap_decoder(model, cpu_kernels: bool = False) -> Decoder:
    """The :class:`Decoder` of a Llama-family causal LM or a peft LoRA model around one; a
    ``ValueError`` for an architecture the runner cannot drive. ``cpu_kernels``: run it on vLLM's
    CPU kernels where this build has them (a model on the CPU)."""
    lora = hasattr(model, "peft_config")
    lm = model.get_base_model() if lora else model
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        raise ValueError(f"llmdoctor: unsupported doctor architecture {type(lm).__name__} (Llama-family decoders only)")
    cfg = lm.config
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise ValueError("llmdoctor: doctors with sliding-window attention are not supported")
    attn0 = layers[0].self_attn
    head_dim = getattr(attn0, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    _check_rope(sys.modules[type(attn0).__module__].apply_rotary_pos_emb, inner.rotary_emb, head_dim)
    out = []
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        gated = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        out.append(Layer(input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
                         q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
                         qkv=_fuse([a.q_proj, a.k_proj, a.v_proj]), o=_fuse([a.o_proj]),
                         gate_up=_fuse([mlp.gate_proj, mlp.up_proj]) if gated else None,
                         down=_fuse([mlp.down_proj]) if gated else None, mlp=mlp,
                         silu=getattr(cfg, "hidden_act", None) in ("silu", "swish"), scaling=a.scaling))
    d = Decoder(embed=inner.embed_tokens, layers=out, norm=inner.norm, rotary=inner.rotary_emb,
                lm_head=_fuse([lm.lm_head]), lora=lora, num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim)
    ops = _vllm_cpu_ops() if cpu_kernels else None
    if ops is not None and inner.embed_tokens.weight.device.type == "cpu":
        d.cpu_ops = ops
        for proj in [p for layer in out for p in (layer.qkv, layer.o, layer.gate_up, layer.down) if p] + [d.lm_head]:
            proj.pack(ops)
    return d


def _check_rope(apply_rotary_pos_emb, rotary, head_dim: int) -> None:
    """Raises unless the model's rotary embedding is the half-rotation one :func:`rope` computes."""
    probe = torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device)
    if probe.device.type == "meta":
        return
    with torch.inference_mode():
        cos, sin = rotary(probe, torch.arange(5, device=probe.device)[None])
        cos, sin = cos.float(), sin.float()
        x = torch.randn(1, 2, 5, head_dim, generator=torch.Generator().manual_seed(0)).to(probe.device)
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        got = rope(x[0].transpose(0, 1), cos[0][:, None], signed_sin(sin[0])[:, None]).transpose(0, 1)
    if cos.shape[-1] != head_dim or not torch.allclose(got, want[0], atol=1e-5):
        raise ValueError("llmdoctor: the doctor's rotary embedding is not the half-rotation kind the runner computes")


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: rotating half of ``x`` is then ``roll(x) * signed_sin``."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (``[..., head_dim]``) with tables that broadcast to it."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def rms_norm(module, x: torch.Tensor, ops=None) -> torch.Tensor:
    """A Llama/Qwen RMSNorm module applied in one fused call (the module itself if it is another
    kind); with ``ops``, vLLM's CPU kernel."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        return module(x)
    if ops is not None and x.dim() == 2 and x.is_contiguous():
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, module.weight, eps)
        return out
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps=eps)
    return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean attention mask (True: the key is seen) as the additive one SDPA would otherwise
    build from it in every layer: built once per step."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def table_rotation(d: Decoder, cos: torch.Tensor, sin_signed: torch.Tensor):
    """Rotates a layer's fused q/k/v heads ``[T, heads + 2 kv_heads, head_dim]`` by per-token tables
    ``cos``/``sin_signed`` ``[T, head_dim]`` (see :func:`signed_sin`); the value heads get the
    identity. The ``[T, heads + 2 kv_heads, head_dim]`` tables are built once per step, so each
    layer rotates its queries and keys in one pass."""
    T, nq, nkv = cos.shape[0], d.num_heads, d.num_kv_heads
    ones = cos.new_ones(()).expand(T, nkv, cos.shape[-1])
    zeros = cos.new_zeros(()).expand(T, nkv, cos.shape[-1])
    c = torch.cat([cos[:, None].expand(T, nq + nkv, -1), ones], dim=1)
    s = torch.cat([sin_signed[:, None].expand(T, nq + nkv, -1), zeros], dim=1)
    return lambda x: rope(x, c, s)


def rotary_cache(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[positions, head_dim]``: each position's cos then sin over half the head, the table vLLM's
    ``rotary_embedding`` kernel reads, from the model's own ``[positions, head_dim]`` cos and sin."""
    half = cos.shape[-1] // 2
    return torch.cat([cos[:, :half], sin[:, :half]], dim=-1).contiguous()


def kernel_rotation(d: Decoder, positions: torch.Tensor, cache: torch.Tensor):
    """Rotates a layer's fused q/k/v heads in place with vLLM's ``rotary_embedding`` kernel (one
    call per layer, reading the queries and keys where the q/k/v matmul wrote them)."""
    nq, nkv, hd = d.num_heads, d.num_kv_heads, d.head_dim
    kernel = d.cpu_ops.rotary_embedding

    def rotate(x):
        flat = x.view(x.shape[0], -1)
        kernel(positions, flat[:, :nq * hd], flat[:, nq * hd:(nq + nkv) * hd], hd, cache, True)
        return x

    return rotate


def _add_rms_norm(d: Decoder, module, delta: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + delta, its norm)``; with vLLM's CPU kernels in one fused call (in place)."""
    eps = getattr(module, "variance_epsilon", None)
    if d.cpu_ops is not None and eps is not None and delta.is_contiguous() and h.is_contiguous():
        torch.ops._C.fused_add_rms_norm(delta, h, module.weight, eps)
        return h, delta
    h = h + delta
    return h, rms_norm(module, h)


def forward_layers(d: Decoder, h: torch.Tensor, rotate, on, attend):
    """The decoder layers over embedded tokens ``h`` ``[T, hidden]``; returns the last hidden states
    (before the final norm). ``attend(layer_index, q, kv)`` stores a layer's new keys and values
    (``[T, 2, kv_heads, head_dim]``) and returns the attention output ``[T, heads * head_dim]``
    for its queries ``q`` ``[T, heads, head_dim]``. ``rotate`` is a :func:`table_rotation` or a
    :func:`kernel_rotation`."""
    x = rms_norm(d.layers[0].input_norm, h, d.cpu_ops)
    for i, layer in enumerate(d.layers):
        q, kv = layer_qkv(d, layer, x, rotate, on)
        h, x = _add_rms_norm(d, layer.post_norm, layer.o(attend(i, q, kv), on), h)
        out = layer_mlp(d, layer, x, on)
        if i + 1 < len(d.layers):
            h, x = _add_rms_norm(d, d.layers[i + 1].input_norm, out, h)
        else:
            h = h + out
    return h


def layer_qkv(d: Decoder, layer: Layer, x: torch.Tensor, rotate, on):
    """Layer's attention inputs for normed hidden states ``x`` ``[T, hidden]``: the rotated queries
    ``[T, heads, head_dim]`` and the rotated keys with the values, ``[T, 2, kv_heads, head_dim]``
    (the layout of a KV pool row). ``rotate``: see :func:`forward_layers`."""
    T, nq, nkv = x.shape[0], d.num_heads, d.num_kv_heads
    x = layer.qkv(x, on).view(T, nq + 2 * nkv, d.head_dim)
    if layer.q_norm is not None:
        x = torch.cat([rms_norm(layer.q_norm, x[:, :nq]), rms_norm(layer.k_norm, x[:, nq:nq + nkv]),
                       x[:, nq + nkv:]], dim=1)
    x = rotate(x)
    return x[:, :nq], x[:, nq:].view(T, 2, nkv, d.head_dim)


def layer_mlp(d: Decoder, layer: Layer, x: torch.Tensor, on) -> torch.Tensor:
    """Layer's MLP branch on normed hidden states ``x``, to be added to the hidden states."""
    if layer.gate_up is None:
        if on is not None and has_lora(layer.mlp):
            raise ValueError("llmdoctor: the delta rule runs a LoRA doctor's adapter on and off per row, "
                             f"which needs a gated MLP (gate, up and down projections): {layer.mlp!r}")
        return layer.mlp(x)
    gate_up = layer.gate_up(x, on)
    if d.cpu_ops is not None and layer.silu and gate_up.is_contiguous():
        act = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
        torch.ops._C.silu_and_mul(act, gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        act = layer.mlp.act_fn(gate) * up
    return layer.down(act, on)
