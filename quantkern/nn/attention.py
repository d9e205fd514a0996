"""Multi-head attention with its four projections as ordinary submodules.

``torch.nn.MultiheadAttention`` keeps the query / key / value projections in one
``in_proj_weight`` Parameter and reads ``out_proj.weight`` directly in its forward, so no
Linear-swapping tool (``replace_linear``, ``quantize_``, ``quantize_modules``) can reach them:
in a model built on it (``nn.TransformerEncoder``, torchvision's ViT) a third of the Linear
weights used to stay in float without a word. :class:`MultiheadAttention` computes the same
function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` submodules
(called through their forward, so they can be swapped for PackedLinear / QuantLinear and
observed by forward hooks); :func:`unfuse_attention` swaps a model's torch attention modules
for it, and :meth:`MultiheadAttention.to_torch` goes back.
"""
from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import skip_init

from ._sites import module_sites, refresh_hooked_weights, swap_module, undo_swaps_on_error


def _positive_int(name: str, v) -> int:
    """``v`` as a Python int (any integer type torch's constructor takes, e.g. numpy's), or ValueError."""
    try:
        i = operator.index(v)
    except TypeError:
        i = None
    if i is None or isinstance(v, bool) or i <= 0:
        raise ValueError(f"quantkern.nn.MultiheadAttention: {name} must be a positive int, got {v!r}")
    return i


def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not allowed to attend) as an additive float mask of ``dtype``; a float
    mask as given (added to the attention logits), as torch's MultiheadAttention does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"quantkern.nn.MultiheadAttention: {name} must be bool or floating point, got {mask.dtype}")
    return mask


# what torch's nn.MultiheadAttention registers (in_proj_weight or q / k / v_proj_weight, the others None)
_TORCH_MHA_STATE = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                              "bias_k", "bias_v", "out_proj"})


def _not_plain(mha: nn.MultiheadAttention) -> str:
    """Why ``mha`` (a subclass of torch's module) is not torch's attention and nothing more ("" when
    it is): its own ``forward`` may compute something else, and state torch's has not would be lost."""
    op = mha.out_proj
    if type(op) not in (NonDynamicallyQuantizableLinear, nn.Linear):
        # (a parametrized out_proj, e.g. parametrizations.weight_norm, became a plain weight in the copy;
        # the hook-based prune / weight_norm keep the type and copy as the weight they compute)
        return f"has an out_proj of type {type(op).__name__}"
    if type(mha) is nn.MultiheadAttention:
        return ""
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return "overrides forward"
    extra = sorted((set(mha._parameters) | set(mha._buffers) | set(mha._modules)) - _TORCH_MHA_STATE)
    return f"holds {extra} besides torch's state" if extra else ""


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` (same constructor, forward and results) whose
    projections are submodules: ``q_proj`` [E <- E], ``k_proj`` [E <- kdim], ``v_proj``
    [E <- vdim] and ``out_proj`` [E <- E], each an ``nn.Linear`` (or whatever replaces it, e.g.
    a PackedLinear). ``bias_k`` / ``bias_v`` ([1, 1, E]) and ``add_zero_attn`` as in torch.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)``: query [L, B, E] (``[B, L, E]`` with
    ``batch_first``, ``[L, E]`` unbatched), key / value [S, B, kdim / vdim]; masks as in torch
    (key_padding_mask [B, S], attn_mask [L, S] or [B * num_heads, L, S], bool or additive
    float). Returns ``(output like query, weights or None)``, weights [B, L, S] averaged over
    heads or [B, num_heads, L, S]. The softmax runs in x's dtype, as torch's does.

    The projections run as three matmuls where torch runs one [3E, E] product for
    self-attention. Build from a torch module with :meth:`from_torch` (bit-exact weights).
    """

    # torch's fused encoder paths (nn.TransformerEncoderLayer / nn.TransformerEncoder) check
    # ``self_attn.in_proj_bias is None`` before reading the fused weights: None makes them step
    # aside to the regular path, which calls this module's forward.
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        embed_dim, num_heads = _positive_int("embed_dim", embed_dim), _positive_int("num_heads", num_heads)
        kdim, vdim = (None if d is None else _positive_int(n, d) for n, d in (("kdim", kdim), ("vdim", vdim)))
        if embed_dim % num_heads:
            raise ValueError(f"quantkern.nn.MultiheadAttention: embed_dim {embed_dim} is not divisible by "
                             f"num_heads {num_heads}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"quantkern.nn.MultiheadAttention: dropout must be in [0, 1], got {dropout!r}")
        # (skip_init's None device would stay on meta: the default device is what nn.Linear would use)
        kw = {"device": torch.get_default_device() if device is None else device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        # read by nn.TransformerEncoder's constructor before it looks at in_proj_bias
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        # built uninitialised, then initialised as torch's module is, in its order of random draws
        # (_reset_parameters): the same seed gives the same weights as nn.MultiheadAttention
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            skip_init(nn.Linear, i, embed_dim, bias=bias, **kw) for i in (embed_dim, self.kdim, self.vdim, embed_dim))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: out_proj as an nn.Linear (its constructor draws first), q / k / v
        xavier-uniform over the fused [3E, E] weight (each on its own when kdim / vdim differ from E),
        zero biases, bias_k / bias_v xavier-normal."""
        if self.out_proj.weight.is_meta:  # (from_torch builds on meta and copies the weights in)
            return
        with torch.no_grad():
            self.out_proj.reset_parameters()
            qkv = (self.q_proj, self.k_proj, self.v_proj)
            if self._qkv_same_embed_dim:
                fused = nn.init.xavier_uniform_(torch.empty(3 * self.embed_dim, self.embed_dim,
                                                            dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device))
                for lin, part in zip(qkv, fused.split(self.embed_dim)):
                    lin.weight.copy_(part)
            else:
                for lin in qkv:
                    nn.init.xavier_uniform_(lin.weight)
            for lin in (*qkv, self.out_proj):
                if lin.bias is not None:
                    lin.bias.zero_()
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
                nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, _copies: dict | None = None) -> "MultiheadAttention":
        """The same attention as ``mha`` (weights copied exactly, ``requires_grad`` and the
        training mode kept; hooks are not copied: :func:`unfuse_attention` moves them). A
        subclass of ``nn.MultiheadAttention`` with its own ``forward`` or extra parameters /
        buffers / submodules is refused (TypeError): the copy would drop them.

        To swap it into an ``nn.TransformerEncoder`` by hand, also call
        ``quantkern.nn.packed_linear.disable_fused_encoder_paths(encoder, [new])``: the encoder's
        nested-tensor path reads ``in_proj_weight`` (:func:`unfuse_attention` does this).
        ``_copies`` (one dict per :func:`unfuse_attention` call): a Parameter that several modules
        share is copied once, so the copies stay tied."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_torch: expected an nn.MultiheadAttention, got {type(mha).__name__}")
        why = _not_plain(mha)
        if why:
            raise TypeError(f"MultiheadAttention.from_torch: {type(mha).__name__} is a subclass of "
                            f"nn.MultiheadAttention that {why}: the copy would compute torch's attention without it")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                  mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, device="meta", dtype=w.dtype)
        E = new.embed_dim  # (a Python int: torch's module keeps whatever integer type it was given)
        copies = {} if _copies is None else _copies

        def param(src, i=None):  # a copy (the new module must not alias the old one's storage), once per
            key = (id(src), i)   # source (or its q / k / v third i): tied sources stay tied
            if key not in copies:  # (the source is kept in the value, so its id is not reused meanwhile)
                t = src.detach() if i is None else src.detach().split(E)[i]
                copies[key] = (src, nn.Parameter(t.clone(), requires_grad=src.requires_grad))
            return copies[key][1]

        if mha._qkv_same_embed_dim:
            ws = [param(mha.in_proj_weight, i) for i in range(3)]
        else:
            ws = [param(p) for p in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
        bs = [param(mha.in_proj_bias, i) for i in range(3)] if mha.in_proj_bias is not None else [None] * 3
        for lin, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
            lin.weight, lin.bias = wt, b
        new.out_proj.weight = param(mha.out_proj.weight)
        ob = mha.out_proj.bias
        new.out_proj.bias = param(ob) if ob is not None else None
        if mha.bias_k is not None:
            new.bias_k, new.bias_v = param(mha.bias_k), param(mha.bias_v)
        return new.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with this module's weights (each projection must be a plain
        ``nn.Linear``; a PackedLinear or QuantLinear is refused): e.g. to put the weights
        :func:`quantkern.ptq.fake_quantize_model_` wrote back into a torch model. torch's module has
        biases on all four projections or on none: where only some have one (bias correction, float
        targets and ERQ add biases to bias-free layers), the others get zero biases (the same function),
        which do not train."""
        lins = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        for name, lin in zip(("q_proj", "k_proj", "v_proj", "out_proj"), lins):
            # torch's module computes F.linear(x, weight, bias): a projection that does more (QuantLinear's
            # fake-quantized weight and input) would be dropped without a word, so it is refused too
            if not isinstance(lin, nn.Linear) or type(lin).forward is not nn.Linear.forward:
                raise TypeError(f"MultiheadAttention.to_torch: {name} is a {type(lin).__name__}, not a plain nn.Linear "
                                "(torch's module holds dense float weights and applies them as they are); replace "
                                "it by an nn.Linear holding the weight you want first")
        w = self.out_proj.weight
        # (the bias flag came from out_proj alone: q / k / v biases beside a bias-free out_proj were
        # dropped without a word, and a bias-free q_proj beside biased k / v failed in torch.cat)
        biases = [lin.bias if lin.bias is not None else w.new_zeros(lin.out_features) for lin in lins]
        has_bias = any(lin.bias is not None for lin in lins)
        m = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, has_bias,
                                  self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim,
                                  self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                m.in_proj_weight.copy_(torch.cat([lin.weight for lin in lins[:3]]))
            else:
                for p, lin in zip((m.q_proj_weight, m.k_proj_weight, m.v_proj_weight), lins[:3]):
                    p.copy_(lin.weight)
            if has_bias:
                m.in_proj_bias.copy_(torch.cat(biases[:3]))
                m.out_proj.bias.copy_(biases[3])
            m.out_proj.weight.copy_(self.out_proj.weight)
            if self.bias_k is not None:
                m.bias_k.copy_(self.bias_k)
                m.bias_v.copy_(self.bias_v)
        # requires_grad as here (a fused torch Parameter trains when any of the parts it joins did)
        for name, p in m.named_parameters():
            parts = {"in_proj_weight": [lin.weight for lin in lins[:3]], "in_proj_bias": [lin.bias for lin in lins[:3]],
                     "q_proj_weight": [lins[0].weight], "k_proj_weight": [lins[1].weight],
                     "v_proj_weight": [lins[2].weight], "out_proj.bias": [self.out_proj.bias]}.get(name)
            parts = [t for t in parts if t is not None] if parts is not None else [self.get_parameter(name)]
            p.requires_grad_(any(t.requires_grad for t in parts))
        return m.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of torch's nn.MultiheadAttention (in_proj_weight / in_proj_bias, or q / k / v_proj_weight)
        # loads here: split into the projections' keys. Without this, strict=False would leave q / k / v at
        # their random init without a word. (This dict is load_state_dict's copy: the caller's is untouched;
        # the children load after this, from it.)
        E = self.embed_dim
        projs = ("q_proj", "k_proj", "v_proj")
        if not any(f"{prefix}{n}.weight" in state_dict or f"{prefix}{n}.bias" in state_dict for n in projs):
            for fused, suffix in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
                t = state_dict.get(prefix + fused)
                if t is None:
                    continue
                if t.dim() < 1 or t.shape[0] != 3 * E:
                    error_msgs.append(f"size mismatch for {prefix}{fused}: torch's checkpoint holds {tuple(t.shape)}, "
                                      f"this attention needs [3 * embed_dim = {3 * E}, ...]")
                    continue
                del state_dict[prefix + fused]
                for n, part in zip(projs, t.split(E)):  # (copies: load_state_dict(assign=True) keeps them)
                    state_dict[f"{prefix}{n}.{suffix}"] = part.clone()
            for n in projs:
                if prefix + f"{n}_weight" in state_dict:
                    state_dict[f"{prefix}{n}.weight"] = state_dict.pop(f"{prefix}{n}_weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        return s

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        op = "quantkern.nn.MultiheadAttention"
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{op}: query, key and value must all be 3-D (batched) or 2-D (unbatched); got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        if not batched:  # one sequence: a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # work in [B, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"{op}: expected query / key / value features {self.embed_dim} / {self.kdim} / "
                             f"{self.vdim}, got {E} / {key.shape[-1]} / {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"{op}: key and value must share batch and sequence sizes with each other and the "
                             f"batch size with query; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)} (as [B, seq, features])")
        H, D = self.num_heads, self.head_dim
        kpm = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{op}: is_causal is a hint that attn_mask is the causal mask; pass the mask too "
                               "(e.g. nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and kpm is None and not need_weights:
            am = None  # SDPA builds the causal mask itself
        else:
            am = _float_mask(attn_mask, "attn_mask", query.dtype)
            is_causal = is_causal and kpm is None
        if am is not None:
            want = (L, S) if am.dim() == 2 else (B * H, L, S)
            if am.dim() not in (2, 3) or tuple(am.shape) != want:
                raise ValueError(f"{op}: attn_mask must have shape {(L, S)} or {(B * H, L, S)}, got {tuple(am.shape)}")
            am = am.view(1, 1, L, S) if am.dim() == 2 else am.view(B, H, L, S)
        if kpm is not None:
            if tuple(kpm.shape) != (B, S):
                raise ValueError(f"{op}: key_padding_mask must have shape {(B, S) if batched else (S,)}, got "
                                 f"{tuple(kpm.shape[int(not batched):])}")
            kpm = kpm.view(B, 1, 1, S)

        q = self.q_proj(query).view(B, L, H, D).transpose(1, 2)
        k, v = self.k_proj(key), self.v_proj(value)
        extra = []  # key positions appended after the S real ones (masks get a zero column each)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], 1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], 1)
            extra.append(1)
        k, v = (t.view(B, t.shape[1], H, D).transpose(1, 2) for t in (k, v))  # (not -1: B may be 0)
        if self.add_zero_attn:
            z = torch.zeros(B, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, z], 2), torch.cat([v, z], 2)
            extra.append(1)
        if extra:
            am = F.pad(am, (0, len(extra))) if am is not None else None
            kpm = F.pad(kpm, (0, len(extra))) if kpm is not None else None
        mask = kpm if am is None else (am if kpm is None else am + kpm)
        p = self.dropout if self.training else 0.0
        if need_weights:
            # as torch's: the mask enters the product itself (baddbmm: one rounding in low precision, and
            # autocast's dtype), over [B * H, L, S']
            S2 = k.shape[2]  # (S plus the appended keys; spelled out: B may be 0)
            qs, kt = (q * math.sqrt(1.0 / D)).reshape(B * H, L, D), k.transpose(-2, -1).reshape(B * H, D, S2)
            if mask is not None:
                logits = torch.baddbmm(mask.expand(B, H, L, S2).reshape(B * H, L, S2), qs, kt)
            else:
                logits = torch.bmm(qs, kt)
            w = torch.softmax(logits.view(B, H, L, S2), dim=-1)
            if p > 0:  # the returned weights are the dropped-out ones, as torch's
                w = F.dropout(w, p)
            out = torch.matmul(w, v)
            weights = w.mean(1) if average_attn_weights else w
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal)
            weights = None
        # torch's memory layout: out_proj runs on [L, B, E] rows and batch_first gets a transposed view of
        # that (a following dropout draws its mask in memory order, so the layout decides which entries it drops)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, B, E))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def unfuse_attention(model: nn.Module, skip=None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (in place) by :class:`MultiheadAttention`
    (the same function, projections as submodules); returns the qualified names replaced. A
    module shared under several names is replaced once and stays shared; ``skip`` (names or a
    predicate, as in :func:`quantkern.nn.replace_linear`) leaves the matching ones alone: a
    shared module is skipped when any of its names matches. The forward / backward hooks of a
    replaced module move to its replacement (the handles still remove them); hooks on torch's
    ``out_proj`` never ran (torch reads its weight) and are not carried.

    A subclass of ``nn.MultiheadAttention`` with its own ``forward`` or extra state is left as it
    is, with a warning (its projections are not reached).

    Encoder layers holding a replaced module stop taking torch's fused inference path (it reads
    the fused weights; the regular path it falls back to computes the same, except at padded
    positions, where the nested-tensor path gave zeros).
    """
    from .packed_linear import _skipped, check_skip, disable_fused_encoder_paths

    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("unfuse_attention: model is itself an nn.MultiheadAttention (it has no parent to be replaced "
                        "in); use quantkern.nn.MultiheadAttention.from_torch(module)")
    check_skip("unfuse_attention", skip)
    refresh_hooked_weights(model)
    replaced, new_mods, kept, copies = [], [], [], {}
    with undo_swaps_on_error():  # a module that fails to convert leaves the model as it came
        for names, sites, mha in module_sites(model, lambda m: isinstance(m, nn.MultiheadAttention)):
            if any(_skipped(n, skip) for n in names):
                continue
            why = _not_plain(mha)
            if why:
                kept.append(f"{names[0]} ({type(mha).__name__} {why})")
                continue
            new_mods.append(swap_module(sites, mha, MultiheadAttention.from_torch(mha, copies)))
            replaced.append(names[0])
        disable_fused_encoder_paths(model, new_mods)
    if kept:
        warnings.warn(f"unfuse_attention: left {len(kept)} nn.MultiheadAttention module(s) as they are, their "
                      f"projections in float: {', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''} (the "
                      "replacement computes torch's attention only); skip them by name to silence this",
                      stacklevel=2)
    return replaced
