"""PackedWeight: a 2/3/4-bit weight in the canonical packed format.

The format (bit layout, padding, groups) is specified by
``quantkern/reference/packing.py``; the same bytes are read by the CPU, CUDA and
Triton kernels. A PackedWeight holds

* ``qweight``: int32 ``[out_features, ceil(in_features / 32) * bits]``
* ``scales``, ``zeros``: ``[out_features, in_features // group_size]`` (fp32/fp16/bf16)
* ``bits`` (2, 3, 4), ``group_size``, ``shape = (out_features, in_features)``

and dequantizes as ``w = (q - zeros) * scales``.
"""
from __future__ import annotations

import torch

from . import ops
from .reference import packing as ref


def scales_lost(cast: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Where casting ``scales`` gave ``cast`` with a relative error beyond 2^-8 (bool, same shape).

    Normal bf16 / fp16 rounding stays within 2^-9; beyond that a scale underflowed to 0 or to a deep
    subnormal (fp16 scales of weights ~1e-6 keep a few bits: 2-3x the output error). A shallow
    subnormal (fp16 1.6e-5: 0.4%) passes."""
    s = scales.to(cast.device).float()
    return ((cast.float() - s).abs() > 2.0**-8 * s.abs()) & (s != 0)


def lost_groups_matter(scales: torch.Tensor, zeros: torch.Tensor, bits: int, lost: torch.Tensor, scale: float) -> bool:
    """Whether any group marked ``lost`` (a scale that underflowed or fell deep into the subnormals)
    spans more than 1e-6 of ``scale`` (the layer's max |W|): negligible groups, e.g. an all-but-zero
    row, lose nothing that matters."""
    if not bool(lost.any()):
        return False
    span = scales[lost].float().abs() * (2**bits - 1 + zeros[lost].float().abs())
    return bool((span > 1e-6 * scale).any())


def cast_meta(scales: torch.Tensor, zeros: torch.Tensor, meta_dtype: torch.dtype | None, who: str,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, zeros)`` moved to ``device`` and cast to ``meta_dtype`` (None: their dtype), refusing a
    cast that loses a scale to underflow (to 0 or a subnormal: :func:`scales_lost`) or overflows a value
    (the weight would silently change)."""
    if meta_dtype is not None and meta_dtype not in ref.META_DTYPES:
        # an int dtype used to be reported as "loses scale(s) to underflow"
        raise TypeError(f"{who}: meta_dtype must be one of {ref.META_DTYPES} or None, got {meta_dtype!r}")
    md = meta_dtype or scales.dtype
    s, z = scales.to(device, md), zeros.to(device, md)
    if md != scales.dtype and s.device.type != "meta":  # (a meta tensor has no values to check)
        lost = scales_lost(s, scales)
        if bool(lost.any()) or not bool(torch.isfinite(s).all() and torch.isfinite(z).all()):
            raise ValueError(f"{who}: casting scales / zeros to {md} loses {int(lost.sum())} scale(s) to "
                             f"underflow (to 0 or a subnormal: relative error > 2^-8) or overflows a value; "
                             f"re-quantize from the float weight with that meta_dtype (PackedWeight.from_float) "
                             f"or keep float32 metadata")
    return s, z


class PackedWeight:
    """A packed low-bit weight ``[out_features, in_features]``; see the module docstring."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 shape):
        shape = tuple(int(d) for d in shape)
        if len(shape) != 2:
            raise ValueError(f"PackedWeight: shape must be (out_features, in_features), got {shape}")
        ops.check_packed("PackedWeight", qweight, scales, zeros, bits, group_size, shape[1])
        if qweight.shape[0] != shape[0]:
            raise ValueError(f"PackedWeight: qweight has {qweight.shape[0]} rows but shape[0] = {shape[0]}")
        # value checks read the data (a host sync): eager only, so that a PackedWeight can be built inside
        # torch.compile(fullgraph=True) (PackedLinear.packed_weight / dequantize in a compiled forward), and
        # outside torch.func transforms (vmap refuses data-dependent control flow over batched scales)
        if (scales.device.type != "meta" and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()):
            for name, t in (("scales", scales), ("zeros", zeros)):
                if t.numel() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"PackedWeight: {name} contain NaN or inf")
        self.qweight = qweight
        self.scales = scales
        self.zeros = zeros
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.shape = shape

    # ------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, W: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                   meta_dtype: torch.dtype | None = None) -> "PackedWeight":
        """Round-to-nearest min-max asymmetric quantization of ``W [out, in]``.

        Per group of ``group_size`` consecutive inputs (None or -1: one group per
        row): ``s = (max - min) / (2**bits - 1)``, ``z = -min / s`` (a float zero
        point), both rounded to ``meta_dtype`` (default: W's dtype if fp16/bf16,
        else fp32), then ``q = clamp(round(W / s + z), 0, 2**bits - 1)``.
        """
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
            raise ValueError(f"PackedWeight.from_float: W must be a 2-D float tensor, got {getattr(W, 'shape', W)}")
        ops._check_bits("PackedWeight.from_float", bits)
        if meta_dtype is not None and meta_dtype not in ref.META_DTYPES:  # (was the reference's unprefixed error)
            raise TypeError(f"quantkern.PackedWeight.from_float: meta_dtype must be one of {ref.META_DTYPES} or None, "
                            f"got {meta_dtype!r}")
        if W.device.type == "meta":  # (failed in the quantizer: "Tensor.item() cannot be called on meta tensors")
            raise ValueError(f"quantkern.PackedWeight.from_float: W (shape {tuple(W.shape)}) is on the meta device: it "
                             f"has no values to quantize; quantize the real weight, or for a meta model build "
                             f"PackedLinear(in_features, out_features, ...) / load_packed(path, device='meta')")
        K = W.shape[1]
        if K == 0:  # else the error named group_size (None -> K = 0) or quantkern.pack's q
            raise ValueError(f"PackedWeight.from_float: W must have in_features > 0, got shape {tuple(W.shape)}")
        gs = K if group_size in (None, -1) else group_size
        ops._check_group("PackedWeight.from_float", K, gs)
        eager = not torch.compiler.is_compiling()  # value checks: eager only (as in __init__)
        if W.device.type != "meta" and W.numel() and eager:
            bad = ~torch.isfinite(W.detach()).all(1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten()[:5].tolist()
                raise ValueError(f"PackedWeight.from_float: W contains NaN or inf (row {', '.join(map(str, rows))}"
                                 f"{', ...' if int(bad.sum()) > 5 else ''}); a weight must be finite to quantize")
        q, s, z = ref.quantize_rtn(W.detach(), bits, gs, meta_dtype)
        if eager and s.dtype != torch.float32 and s.device.type != "meta" and s.numel():
            # a scale deep in the subnormals of fp16 / bf16 keeps few bits (the rule of scales_lost:
            # relative error > 2^-8; fp16 below 2^-16): the weight got several times RTN's error without a
            # word. Negligible groups (1e-6 of max |W|, e.g. an all-but-zero row) pass.
            fi = torch.finfo(s.dtype)
            tiny = (s != 0) & (s.float().abs() < fi.tiny * fi.eps * 2.0**8)
            if lost_groups_matter(s, z, bits, tiny, float(W.detach().abs().max())):
                raise ValueError(f"PackedWeight.from_float: {int(tiny.sum())} group scale(s) of W (max |W| = "
                                 f"{float(W.detach().abs().max()):.3g}) fall deep into {s.dtype}'s subnormals, which "
                                 f"keep few bits of them; use meta_dtype=torch.float32 or torch.bfloat16 (or rescale W)")
        if eager and s.device.type != "meta" and s.numel() and not bool(torch.isfinite(s).all() and torch.isfinite(z).all()):
            # fp32 metadata overflows only for a (float64) W beyond the fp32 range: suggesting
            # meta_dtype=torch.float32 there would be no help
            fix = "rescale W" if s.dtype == torch.float32 else "use meta_dtype=torch.float32 (or rescale W)"
            raise ValueError(f"PackedWeight.from_float: W (max |W| = {float(W.detach().abs().max()):.4g}) has values or "
                             f"group ranges that overflow the {s.dtype} scales / zeros; {fix}")
        return cls(ops.pack(q, bits), s.contiguous(), z.contiguous(), bits, gs, W.shape)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int | None = None) -> "PackedWeight":
        """From integer codes ``q [N, K]`` and per-group ``scales``/``zeros [N, G]``."""
        for name, t in (("q", q), ("scales", scales), ("zeros", zeros)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"PackedWeight.from_quantized: {name} must be a 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        K = q.shape[1]
        if group_size in (None, -1):
            G = scales.shape[1]
            gs = K // G if G else 0
            try:
                ops._check_group("PackedWeight.from_quantized", K, gs)
            except ValueError:  # name what the caller passed, not a group_size inferred from it
                raise ValueError(f"PackedWeight.from_quantized: scales has {G} groups per row, which gives no valid "
                                 f"group size for in_features K = {K} (need K / G a multiple of 32 dividing K, or "
                                 f"G = 1); got scales {tuple(scales.shape)}") from None
        else:
            gs = group_size
        return cls(ops.pack(q, bits), scales.contiguous(), zeros.contiguous(), bits, gs, q.shape)

    @classmethod
    def from_hqq(cls, W_q, meta=None, meta_dtype=None) -> "PackedWeight":
        """Exact conversion from hqq's packed format; see :func:`quantkern.formats.from_hqq`."""
        from .formats import from_hqq

        return from_hqq(W_q, meta, meta_dtype=meta_dtype)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, bits: int = 4, group_size: int | None = None, g_idx=None,
                  zero_offset: int = 1, meta_dtype=None, return_perm: bool = False):
        """Exact conversion from GPTQ-style int32 tensors; see :func:`quantkern.formats.from_gptq`
        (``return_perm=True``: ``(PackedWeight, perm)``, needed for an act-order ``g_idx``)."""
        from .formats import from_gptq

        return from_gptq(qweight, qzeros, scales, bits, group_size, g_idx=g_idx, zero_offset=zero_offset,
                         meta_dtype=meta_dtype, return_perm=return_perm)

    # ------------------------------------------------------------ accessors
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def meta_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def unpack(self) -> torch.Tensor:
        """Integer codes ``[out, in]`` uint8."""
        return ops.unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
        """``(q - zeros) * scales`` as a dense ``[out, in]`` tensor (fp32 math, returned in ``dtype``)."""
        return ops.dequantize(self, dtype, backend=backend)

    def to(self, device=None, meta_dtype: torch.dtype | None = None) -> "PackedWeight":
        """A PackedWeight on ``device`` (and with scales/zeros cast to ``meta_dtype`` when given).

        Like ``Tensor.to``, tensors already on ``device`` (with that dtype) are shared, not copied.
        The codes are kept, so a cast that loses a scale (underflow to 0) or overflows a zero
        raises instead of returning a silently different weight."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"PackedWeight.to: got the dtype {device} as device; the codes keep their format, "
                            f"use meta_dtype={device} to cast the scales / zeros")
        s, z = cast_meta(self.scales, self.zeros, meta_dtype, "PackedWeight.to", device)
        return PackedWeight(self.qweight.to(device), s, z, self.bits, self.group_size, self.shape)

    def tensors(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def __repr__(self) -> str:
        return (f"PackedWeight(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
                f"meta_dtype={self.scales.dtype}, device={self.device})")


# ---------------------------------------------------------------- checkpoints (safetensors)
FORMAT_NAME = "quantkern.packed"
FORMAT_VERSION = "1"
LAYOUT = "blocks32-lsb;int4=lo16/hi16-nibbles;int2=fields8;int3=lo2plane+hi1plane"


def save_packed(weights: dict, path: str, extra: dict | None = None, metadata: dict | None = None) -> None:
    """Save ``{name: PackedWeight}`` (plus optional plain tensors in ``extra``) to a safetensors file.

    Tensors are stored as ``<name>.qweight``, ``<name>.scales``, ``<name>.zeros``; the
    header metadata records the format name and version, the layout string and,
    per weight, bits / group_size / shape, and is validated by :func:`load_packed`.
    ``metadata``: additional ``{str: str}`` header entries (not the reserved keys), read
    back with :func:`read_packed_metadata`. Never pickle. ``path``: a str or path-like; ``~`` is
    expanded; its folder must exist.
    """
    import json
    import os

    from safetensors.torch import save_file

    tensors, meta = {}, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": LAYOUT}
    info = {}
    seen = set()

    def own(t):
        # safetensors refuses tensors that share memory: one PackedWeight saved under two names (tied
        # layers) raised "Some tensors share memory"; copy a tensor whose storage is already saved
        t = t.detach().contiguous().cpu()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        return t

    for name, w in weights.items():
        if not isinstance(name, str):  # json.dumps would turn 1 into "1": it would load under another key
            raise TypeError(f"save_packed: weight names must be str, got {name!r}")
        if not isinstance(w, PackedWeight):
            raise TypeError(f"save_packed: {name!r} is {type(w).__name__}, not a PackedWeight")
        for k, t in w.tensors().items():
            tensors[f"{name}.{k}"] = own(t)
        info[name] = {"bits": w.bits, "group_size": w.group_size, "shape": list(w.shape)}
    for name, t in (extra or {}).items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_packed: extra must map str names to tensors, got {name!r}: {type(t).__name__}")
        if name in tensors:  # would silently replace a packed weight's tensor
            raise ValueError(f"save_packed: extra tensor {name!r} clashes with a packed weight's tensor of that name")
        tensors[name] = own(t)
    meta["weights"] = json.dumps(info, sort_keys=True)
    for k, v in (metadata or {}).items():
        if k in meta or not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"save_packed: metadata must map new str keys to str values, got {k!r}: {type(v).__name__}")
        meta[k] = v
    # (safetensors' own error for a missing folder or a directory named a temporary file beside the path)
    path = os.path.expanduser(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_packed: the folder {folder!r} of {path!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_packed: path {path!r} is a directory; give a file name")
    save_file(tensors, path, metadata=meta)


def _safe_open(op: str, path, device: str):
    """safetensors' safe_open, with errors that name the file: its own say "No such device (os error 19)"
    for a directory and "invalid header length" for a truncated file, naming neither."""
    import os

    from safetensors import SafetensorError, safe_open

    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{op}: path {str(path)!r} is a directory; expected a safetensors file written by "
                                "save_packed")
    try:
        return safe_open(path, framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{op}: {path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_packed_metadata(path: str) -> dict:
    """The safetensors header metadata of a :func:`save_packed` file (``{str: str}``)."""
    with _safe_open("read_packed_metadata", path, "cpu") as f:
        return dict(f.metadata() or {})


def _weights_header(text: str, path: str) -> dict:
    """The ``weights`` header entry, checked: ``{name: {"bits": int, "group_size": int | None,
    "shape": [N, K]}}`` (JSON ints, not strings or floats)."""
    import json

    def bad(why):
        return ValueError(f"load_packed: {path}: bad 'weights' header ({why})")

    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(info, dict):
        raise bad(f"expected an object of layers, got {type(info).__name__}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for name, d in info.items():
        if not isinstance(d, dict) or set(d) != {"bits", "group_size", "shape"}:
            raise bad(f"layer {name!r}: expected keys bits, group_size, shape, got {d!r}")
        if not is_int(d["bits"]) or not (d["group_size"] is None or is_int(d["group_size"])):
            raise bad(f"layer {name!r}: bits and group_size must be integers, got {d['bits']!r}, {d['group_size']!r}")
        shp = d["shape"]
        if not (isinstance(shp, list) and len(shp) == 2 and all(is_int(v) and v > 0 for v in shp)):
            raise bad(f"layer {name!r}: shape must be [N, K] positive integers, got {shp!r}")
        d["shape"] = tuple(shp)
    return info


def load_packed(path: str, device="cpu") -> tuple[dict, dict]:
    """Load a :func:`save_packed` file: ``({name: PackedWeight}, {name: extra tensor})``.

    Raises ValueError if the header is not a quantkern packed checkpoint of a
    supported version and layout, or if a weight's tensors do not match its
    recorded bits / group size / shape.
    """
    device = torch.device(device)
    # read on the CPU and move each checked tensor: safe_open itself refuses device="meta" (and its error
    # would read as a damaged file), and a bad tensor is then refused before it takes device memory
    with _safe_open("load_packed", path, "cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"load_packed: {path} is not a {FORMAT_NAME} checkpoint (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"load_packed: unsupported format_version {meta.get('format_version')!r} "
                             f"(this quantkern reads {FORMAT_VERSION})")
        if meta.get("layout") != LAYOUT:
            raise ValueError(f"load_packed: unknown layout {meta.get('layout')!r} (expected {LAYOUT!r})")
        if "weights" not in meta:
            raise ValueError(f"load_packed: {path}: the header has no 'weights' entry (bits / group size / shape "
                             f"of the packed weights)")
        info = _weights_header(meta["weights"], path)
        keys = set(f.keys())
        weights = {}
        for name, d in info.items():
            missing = [f"{name}.{k}" for k in ("qweight", "scales", "zeros") if f"{name}.{k}" not in keys]
            if missing:
                raise ValueError(f"load_packed: {path}: the header lists weight {name!r} but the file has no {missing}")
            t = {k: f.get_tensor(f"{name}.{k}") for k in ("qweight", "scales", "zeros")}
            try:
                w = PackedWeight(t["qweight"], t["scales"], t["zeros"], d["bits"], d["group_size"], d["shape"])
            except (TypeError, ValueError) as e:  # say which file and which of its weights is bad
                raise type(e)(f"load_packed: {path}: weight {name!r}: {e}") from None
            weights[name] = w.to(device)
            keys -= {f"{name}.qweight", f"{name}.scales", f"{name}.zeros"}
        extra = {k: f.get_tensor(k).to(device) for k in sorted(keys)}
    return weights, extra
