"""``dfq-deploy`` end to end on a tiny random-weight model, and its one-line errors on bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dfq_deploy.cli import main
from dfq_deploy.export.parity import NUM_PROBES
from dfq_deploy.models import ModelSpec, create_model
from tests.conftest import TINY_KWARGS, make_image_folder

TINY = ["--model", "deit_t", "--model-kwargs", ",".join(f"{k}={v}" for k, v in TINY_KWARGS.items())]


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("bits, calib", [("8", "real"), ("4", "noise")])
def test_export_and_eval(tmp_path, capsys, caplog, bits, calib):
    caplog.set_level(logging.INFO, logger="dfq_deploy")
    data = make_image_folder(tmp_path / "data", classes=10, per_class=2)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "export", *TINY, "--random-weights", "--bits", bits, "--calib", calib,
                             "--calib-dir", str(data), "--num-samples", "8", "--output", str(out),
                             "--eval-data", str(data), "--parity-threshold", "0.8")
    assert code == 0, err
    assert "wrote" in stdout and "FP16 graph" in stdout and "accuracy of the exported model" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["quant_config"]["name"] == {"8": "W8A8", "4": "W4A16"}[bits]
    assert report["precision"] == {"8": "int8", "4": "int4"}[bits]
    assert report["dtype"] == report["parity"]["graph_dtype"] == "fp16"  # the default: what TensorRT builds
    assert report["calibration"]["source"] == calib and report["calibration"]["num_samples"] == 8
    assert report["parity"]["passed"] and report["parity"]["held_back"]["n"] == 8 + NUM_PROBES
    assert report["lint"] == []
    assert report["accuracy"]["n"] == 20 and 0.0 <= report["accuracy"]["top1"] <= 1.0
    assert report["size_bytes"] == (out / "model.onnx").stat().st_size
    assert set(report["timings"]) >= {"quantize_s", "export_s", "parity_s", "eval_s"}
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    logged = [r.getMessage() for r in caplog.records]
    plan = next(m for m in logged if m.startswith("export plan:"))
    assert "quantize" in plan and "parity (" in plan and "accuracy on" in plan
    summary = next(m for m in logged if m.startswith("time: "))
    assert "s in all:" in summary and "parity" in summary

    code, stdout, err = _run(capsys, "eval", "--onnx", str(out / "model.onnx"), "--data", str(data), "--limit", "5")
    assert code == 0
    result = json.loads(stdout)
    assert result["n"] == 5 and result["top1"] <= result["top5"]
    assert "top-1" in err


def test_eval_torch_matches_manual_count(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=1)
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    model = create_model(ModelSpec("deit_t", kwargs=dict(TINY_KWARGS), random_weights=True))
    torch.save(model.state_dict(), ckpt)
    code, stdout, _ = _run(capsys, "eval", *TINY, "--checkpoint", str(ckpt), "--data", str(data))
    assert code == 0
    from dfq_deploy.data import load_images
    from dfq_deploy.models import data_config

    x, y = load_images(data, data_config(model))
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).float().mean().item()
    assert json.loads(stdout)["top1"] == pytest.approx(expected)


def _bad_inputs(tmp_path):
    ok_data = make_image_folder(tmp_path / "data", per_class=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("hi")
    (tmp_path / "fake" / "cls").mkdir(parents=True)
    (tmp_path / "fake" / "cls" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    other = create_model(ModelSpec("deit_t", kwargs={**TINY_KWARGS, "depth": 1}, random_weights=True))
    torch.save(other.state_dict(), tmp_path / "depth1.pt")
    (tmp_path / "afile").write_text("")
    exp = ["export", *TINY, "--random-weights"]
    return [
        (["export", "--model", "no_such_net", "--random-weights"], "unknown model 'no_such_net'"),
        ([*exp, "--bits", "5"], "--bits 5 has no deployable"),
        (["export", *TINY, "--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["export", *TINY, "--checkpoint", str(tmp_path / "corrupt.safetensors")], "could not be read"),
        (["export", *TINY, "--checkpoint", str(tmp_path / "corrupt.pt")], "could not be read"),
        (["export", *TINY, "--checkpoint", str(tmp_path / "depth1.pt")], "does not match"),
        (["export", "--model", "deit_t", "--model-kwargs", "depth"], "bad --model-kwargs item"),
        (["export", "--model", "deit_t", "--model-kwargs", "colour=3", "--random-weights"], "bad --model-kwargs"),
        ([*exp, "--calib", "real"], "--calib real needs --calib-dir"),
        ([*exp, "--calib", "real", "--calib-dir", str(empty)], "has no class sub-folders"),
        ([*exp, "--calib", "real", "--calib-dir", str(tmp_path / "noimg")], "has no images"),
        ([*exp, "--calib", "real", "--calib-dir", str(tmp_path / "fake")], "not a readable image"),
        ([*exp, "--calib", "magic"], "unknown calibration source 'magic'"),
        ([*exp, "--preset", "W4A4"], "simulated only"),
        ([*exp, "--eval-data", str(tmp_path / "deV")], "data folder not found"),
        ([*exp, "--calib-from", str(tmp_path / "nosynth")], "does not exist"),
        ([*exp, "--calib", "real", "--calib-dir", str(tmp_path / "nowhere")], "data folder not found"),
        (["synth", *TINY, "--random-weights", "--method", "magic"], "unknown"),
        (["eval", *TINY, "--random-weights", "--data", str(tmp_path / "nowhere")], "data folder not found"),
        (["eval", "--onnx", str(tmp_path / "no.onnx"), "--data", str(ok_data)], "ONNX file not found"),
    ]


def test_bad_inputs_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    for argv, message in _bad_inputs(tmp_path):
        if argv[0] == "export":
            argv = [*argv, "--output", str(out)]
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        lines = [line for line in err.splitlines() if line.startswith("dfq-deploy: error:")]
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert "Traceback" not in err
        assert not out.exists(), argv  # nothing half-written, and no empty folder the command made


def test_no_offline_weights_names_checkpoint(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    data = make_image_folder(tmp_path / "data", classes=2, per_class=1)
    code, _, err = _run(capsys, "eval", "--model", "deit_t", "--data", str(data))
    assert code == 2 and "--checkpoint" in err and "offline" in err


def test_unwritable_output(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--output", str(tmp_path / "afile" / "out"))
    assert code == 2 and "not writable" in err


def test_failed_parity_leaves_nothing(tmp_path, capsys, monkeypatch):
    import dfq_deploy.pipeline as pipeline
    from tests.export.sabotage import transposed

    real_to_onnx = pipeline.to_onnx
    monkeypatch.setattr(pipeline, "to_onnx", lambda *a, **k: transposed(real_to_onnx(*a, **k), 0))  # a buggy exporter
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--bits", "4", "--calib", "noise",
                        "--output", str(out))
    assert code == 2 and "nothing was written" in err
    assert not out.exists()  # nothing written, and the folder the command made is gone


@pytest.fixture
def exported(tmp_path, capsys):
    out = tmp_path / "w4"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--bits", "4", "--output", str(out),
                        "--num-samples", "4", "--calib", "noise")
    assert code == 0, err
    return out


def test_bench_and_report_commands(tmp_path, capsys, exported):
    out = tmp_path / "bench"
    code, stdout, err = _run(capsys, "bench", str(exported / "model.onnx"), "--batch", "1,2", "--iters", "4",
                             "--warmup", "1", "--accuracy-from", str(exported / "report.json"), "--output", str(out))
    assert code == 0, err
    bench = json.loads((out / "bench.json").read_text())
    assert [b["batch"] for b in bench["artifacts"][0]["batches"]] == [1, 2]
    assert bench["power"]["available"] is False  # no energy source here: reported, never invented
    assert (out / "bench.csv").is_file() and "p50" in stdout
    code, stdout, err = _run(capsys, "report", str(out), str(exported), "--output", str(tmp_path / "merged"))
    assert code == 0, err
    assert (tmp_path / "merged" / "report.md").is_file()
    code, _, err = _run(capsys, "bench", str(exported / "model.onnx"), "--batch", "one", "--output", str(out))
    assert code == 2 and "--batch 'one'" in err


def test_build_plan_and_missing_tensorrt(capsys, exported):
    import importlib.util

    code, stdout, _ = _run(capsys, "build", str(exported / "model.onnx"), "--dry-run")
    assert code == 0
    plan = json.loads(stdout)
    assert plan["strongly_typed"] is True and plan["builder_flags"] == []
    if importlib.util.find_spec("tensorrt") is None:
        code, _, err = _run(capsys, "build", str(exported / "model.onnx"))
        assert code == 2 and "TensorRT is not installed" in err
        assert not (exported / "model.engine").exists()


def test_synth_command_writes_a_run(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["synth", *TINY, "--random-weights", "--method", "psaq", "--iters", "3", "--num-samples", "2",
            "--output", str(out), "-q"]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    assert {"images.safetensors", "config.json", "loss.json", "contact_sheet.png"} <= {p.name for p in out.iterdir()}
    assert len(json.loads((out / "loss.json").read_text())["iteration"]) == 3  # one loss row per iteration
    code, _, err = _run(capsys, *argv)  # the folder holds a finished run: refuse to overwrite silently
    assert code == 2 and "--resume" in err
    code, _, err = _run(capsys, *argv[:-3], "--output", str(tmp_path / "x"), "--options", "{bad")
    assert code == 2 and "not valid JSON" in err


def test_export_from_saved_synth_run_with_corrections(tmp_path, capsys):
    synth = tmp_path / "synth"
    code, _, err = _run(capsys, "synth", *TINY, "--random-weights", "--method", "dfqvit", "--iters", "2",
                        "--num-samples", "4", "--output", str(synth), "-q")
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--bits", "4", "--calib-from", str(synth),
                        "--correct", "full", "--plot", "--output", str(out), "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["from"] == str(synth) and report["calibration"]["num_samples"] == 4
    assert report["calibration"]["held_back_source"] == "noise"
    assert report["correction"]["mode"] == "full"
    assert (out / "correction.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--calib-from", str(tmp_path / "none"),
                        "--output", str(tmp_path / "o2"), "-q")
    assert code == 2 and "dfq-deploy: error:" in err


def test_export_runs_a_synthesizer_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--bits", "8", "--calib", "psaq",
                        "--synth-iters", "2", "--num-samples", "2", "--parity-threshold", "0.5",
                        "--output", str(out), "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "psaq" and report["calibration"]["iterations"] == 2
    assert report["calibration"]["held_back_source"] == "noise"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--calib", "psaq", "--synth-iters", "0",
                        "--output", str(tmp_path / "o2"), "-q")
    assert code == 2 and "--synth-iters 0" in err


def test_export_default_calibration_is_data_free():
    from dfq_deploy.cli import build_parser
    from dfq_deploy.config import DEFAULT_CALIB, DEFAULT_SYNTH_ITERS, CalibrationConfig, CorrectionConfig
    from dfq_deploy.pipeline import ExportOptions
    from dfq_deploy.synth import METHODS

    args = build_parser().parse_args(["export"])
    assert args.calib == ExportOptions().calibration.source == DEFAULT_CALIB
    assert DEFAULT_CALIB in METHODS.names()  # a synthesis method: neither noise nor real data
    assert args.synth_iters == ExportOptions().calibration.iterations == DEFAULT_SYNTH_ITERS
    # every default the parser shows comes from the configs
    cor = CorrectionConfig()
    assert (args.correct, args.reconstruct_iters, args.reparam) == (cor.mode, cor.reconstruct_iters, cor.reparam)
    assert args.num_samples == CalibrationConfig().num_samples


@pytest.mark.parametrize("flags, dtype, precision", [
    (["--bits", "16"], "fp16", "fp16"),
    pytest.param(["--bits", "32"], "fp32", "fp32", marks=pytest.mark.slow),  # fast: the --bits 32 eval test
    (["--bits", "8", "--dtype", "fp32"], "fp32", "int8"),
])
def test_export_graph_dtype(tmp_path, capsys, flags, dtype, precision):
    import onnx

    from dfq_deploy.export.fp16 import graph_dtype

    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", *flags, "--calib", "noise",
                        "--num-samples", "4", "--output", str(out), "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == dtype and report["precision"] == precision
    assert graph_dtype(onnx.load(str(out / "model.onnx"))) == dtype


@pytest.mark.parametrize("flags, needle", [
    (["--bits", "16", "--dtype", "fp32"], "--bits 16 is the fp16 float graph"),
    (["--bits", "32", "--dtype", "fp16"], "--bits 32 is the fp32 float graph"),
])
def test_export_dtype_conflicts_one_line(tmp_path, capsys, flags, needle):
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", *flags, "--output", str(tmp_path / "o"), "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_eval_on_a_folder_of_some_classes_scores_them_by_name(tmp_path, capsys):
    """`cat/` and `dog/` alone are labelled 3 and 5 (the bundled model's names), not 0 and 1: no silent 0%."""
    import shutil

    from dfq_deploy.data import default_cifar10

    part = tmp_path / "catdog"
    for cls in ("cat", "dog"):
        (part / cls).mkdir(parents=True)
        for src in sorted((default_cifar10("dev") / cls).iterdir())[:20]:
            shutil.copy(src, part / cls / src.name)
    code, stdout, _ = _run(capsys, "eval", "--data", str(part))
    assert code == 0
    assert json.loads(stdout)["top1"] > 0.4  # the float model scores about 0.6 on these 40
    out = tmp_path / "fp32"
    assert _run(capsys, "export", "--bits", "32", "--output", str(out))[0] == 0
    code, stdout, _ = _run(capsys, "eval", "--onnx", str(out / "model.onnx"), "--data", str(part))
    assert code == 0 and json.loads(stdout)["top1"] > 0.4  # the graph carries the class names
    (part / "cat").rename(part / "kitten")
    code, _, err = _run(capsys, "eval", "--onnx", str(out / "model.onnx"), "--data", str(part))
    assert code == 2 and "kitten are not classes of the model" in err and len(err.strip().splitlines()) == 1


def test_interrupted_export_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch):
    import dfq_deploy.pipeline

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dfq_deploy.pipeline, "quantize_", interrupt)  # Ctrl-C in the middle of the job
    made = tmp_path / "new" / "deeper"
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", "--calib", "noise", "--output", str(made))
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "new").exists()  # both folders it created are gone
    kept = tmp_path / "kept"
    kept.mkdir()
    assert _run(capsys, "export", *TINY, "--random-weights", "--calib", "noise", "--output", str(kept))[0] == 130
    assert kept.is_dir()  # a folder that was there before stays


def test_synth_options_are_checked_before_any_model_work(tmp_path, capsys, monkeypatch):
    import dfq_deploy.models

    def no_model(*_a, **_k):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(dfq_deploy.models, "create_model", no_model)
    code, _, err = _run(capsys, "synth", "--options", '{"alpha1": 100}', "--output", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "alpha1" in err and "global_frac" in err  # the default method is dfqvit: its own option as example
    example = err.split("--options '")[1].split("'")[0]
    monkeypatch.undo()
    from dfq_deploy.synth import method_options

    assert method_options("dfqvit", json.loads(example)).global_frac == 0.3  # the example is valid
    code, _, err = _run(capsys, "synth", "--method", "spdfq", "--options", "{bad", "--output", str(tmp_path / "s"))
    assert code == 2 and "for spdfq" in err
    assert not (tmp_path / "s").exists()


def test_unknown_model_suggests_the_aliases_and_the_bundled_model_first(capsys):
    code, _, err = _run(capsys, "export", "--model", "deit_tinyy", "--random-weights")
    assert code == 2
    suggested = err.split("did you mean ")[1].rstrip("?\n").split(", ")
    assert suggested[:2] == ["deit_t", "deit_tiny_cifar10"] and "deit3_base_patch16_224" not in suggested
    assert "vit_l" in err  # every alias is listed


def test_export_auto_writes_one_mixed_graph_and_reports_each_unit(tmp_path, capsys, monkeypatch):
    import onnx

    monkeypatch.setenv("HOME", str(tmp_path))  # the sensitivity cache goes under ~/.cache
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "export", *TINY, "--random-weights", "--auto", "bits:3", "--calib", "noise",
                             "--num-samples", "8", "--output", str(out), "--eval-data", str(data), "-q")
    assert code == 0, err
    assert "mixed precision (bits:3)" in stdout and "predicted top-1 drop" in stdout
    report = json.loads((out / "report.json").read_text())
    mixed = report["mixed"]
    assert mixed["effective_bits"] <= 3 and report["quant_config"]["layers"]
    assert {u["unit"]: u["format"] for u in mixed["units"] if u["format"] != "FP16"} == \
        report["quant_config"]["layers"]
    assert all("kl" in u and "bytes" in u for u in mixed["units"])
    assert mixed["measured_drop"] == pytest.approx(100 * (mixed["float_top1"] - report["accuracy"]["top1"]))
    assert report["parity"]["passed"] and report["lint"] == []
    est = report["estimate"]
    assert 0 <= est["agreement"] <= 1 and est["interval"][0] <= est["predicted_drop"] <= est["interval"][1]
    proto = onnx.load(str(out / "model.onnx"))
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert blocked  # the 2-4-bit units are blocked INT4 weights in the one graph


@pytest.mark.parametrize("flags, needle", [
    (["--auto", "bits"], "KIND:VALUE"),
    (["--auto", "latency:3"], "--cost-table"),
    (["--auto", "bits:3", "--auto-formats", "FP16,W4A4"], "simulated only"),
    (["--auto", "bits:3", "--auto-formats", "FP16,W9A9"], "unknown preset"),
])
def test_export_auto_refuses_bad_budgets_in_one_line(tmp_path, capsys, flags, needle):
    code, _, err = _run(capsys, "export", *TINY, "--random-weights", *flags, "--output", str(tmp_path / "o"), "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", [  # NVFP4's parity runs in the pure-Python reference evaluator: slow set
    ("--bits", "fp8"), pytest.param(("--preset", "NVFP4"), marks=pytest.mark.slow)])
def test_export_float_formats(tmp_path, capsys, how):
    """``export --bits fp8`` writes an FP16-typed FP8 graph checked in ONNX Runtime; ``--preset NVFP4`` an NVFP4
    graph checked in ONNX's reference evaluator, with its accuracy labelled simulated (issue #30)."""
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "export", *TINY, "--random-weights", *how, "--calib", "noise",
                             "--num-samples", "8", "--output", str(out), "--eval-data", str(data))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    fp8 = how[1] == "fp8"
    assert report["quant_config"]["name"] == ("FP8" if fp8 else "NVFP4")
    assert report["precision"] == ("fp8" if fp8 else "fp4") and report["dtype"] == "fp16"
    assert report["parity"]["passed"] and report["lint"] == []
    assert report["parity"]["runtime"].startswith("onnxruntime" if fp8 else "onnx.reference")
    assert report["accuracy"]["measured_on"].startswith("onnxruntime" if fp8 else "simulated")
    assert report["estimate"]["measured_on"].startswith("onnxruntime" if fp8 else "simulated")
