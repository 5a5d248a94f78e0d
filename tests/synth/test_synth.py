"""The shared synthesis loop, checkpoints/resume, NaN handling and the output folder (dfq_deploy.synth)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dfq_deploy.quant  # noqa: F401  (registers the fake-quant student the hard stage needs, as export does)
from dfq_deploy.errors import DfqError
from dfq_deploy.models import ModelSpec, create_model, data_config
from dfq_deploy.synth import (
    METHODS,
    SOURCES,
    CalibRequest,
    get_source,
    load_synth_dir,
    synthesize,
    synthesize_to_dir,
)
from dfq_deploy.synth import psaq as psaq_mod
from dfq_deploy.synth.checkpoint import load_checkpoint
from dfq_deploy.synth.dfqvit import DfqvitOptions
from dfq_deploy.synth.priors import total_variation, valid_range
from dfq_deploy.synth.psaq import PsaqOptions
from dfq_deploy.synth.run import write_loss_plot
from dfq_deploy.synth.schedule import Stage, lr_at
from dfq_deploy.synth.spdfq import SpdfqOptions

TINY = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}


def sharpen_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every Linear weight with unit gain, so that a random model's outputs depend on its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.in_features**0.5)
    return model


@pytest.fixture
def model() -> torch.nn.Module:
    return sharpen_(create_model(ModelSpec("deit_t", kwargs=dict(TINY), random_weights=True)))


@pytest.fixture
def cfg(model: torch.nn.Module) -> dict:
    return data_config(model)


def small(**kw) -> dict:
    return {"num_samples": 4, "iterations": 8, "seed": 1, **kw}


# --- registry and options ---------------------------------------------------------------------------------
def test_registry_lists_the_synthesis_methods():
    for name in ("psaq", "spdfq", "dfqvit"):
        assert name in SOURCES
        assert name in METHODS
    assert {"noise", "real"} <= set(SOURCES.names())
    with pytest.raises(DfqError, match="choose one of"):
        synthesize(torch.nn.Linear(2, 2), {}, "nope")


@pytest.mark.parametrize("cls", [PsaqOptions, SpdfqOptions, DfqvitOptions])
def test_options_round_trip_json(cls):
    opts = cls(num_samples=7, seed=3, iterations=11, lr=0.1, betas=(0.4, 0.8), batch_size=2)
    back = cls.from_json(opts.to_json())
    assert back == opts
    assert isinstance(back.betas, tuple)
    assert json.loads(opts.to_json())["betas"] == [0.4, 0.8]
    with pytest.raises(DfqError, match="unknown option"):
        cls.from_dict({"iterations": 3, "bogus": 1})
    with pytest.raises(DfqError, match="iterations"):
        cls(iterations=0)
    with pytest.raises(DfqError, match="lr"):
        cls.from_dict({"lr": -1.0})


def test_method_specific_option_validation_and_unserialised_student():
    with pytest.raises(DfqError, match="max_semantics"):
        SpdfqOptions(max_semantics=5)
    with pytest.raises(DfqError, match="crop_scale"):
        SpdfqOptions(crop_scale=(0.8, 0.5))
    with pytest.raises(DfqError, match="global_frac"):
        DfqvitOptions(global_frac=0.7, hard_frac=0.5)
    opts = DfqvitOptions(student=lambda x: x)
    assert "student" not in opts.to_dict()
    assert DfqvitOptions.from_json(opts.to_json()).student is None


# --- schedule and priors ----------------------------------------------------------------------------------
def test_lr_schedule_warms_up_decays_and_restarts_per_stage():
    stages = [Stage("main", 0, 100)]
    lrs = [lr_at(stages, i, 0.2, 0.1) for i in range(100)]
    assert lrs[0] == pytest.approx(0.02) and lrs[9] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 0.001
    two = [Stage("global", 0, 30), Stage("detail", 30, 100, restart_lr=True)]
    assert lr_at(two, 29, 0.2, 0.0) < 0.01
    assert lr_at(two, 30, 0.2, 0.0) == pytest.approx(0.2)


def test_total_variation_prefers_smooth_images():
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
    assert total_variation(torch.ones(2, 3, 8, 8)) == 0
    assert total_variation(smooth) < 0.2 * total_variation(noise)
    assert total_variation(noise) == pytest.approx(8.0, rel=0.1)  # 4 directions x E[(a-b)^2] = 2


def test_valid_range_matches_the_data_config(cfg):
    lo, hi = valid_range(cfg)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    assert torch.allclose(lo.flatten(), -mean / std) and torch.allclose(hi.flatten(), (1 - mean) / std)


# --- the loop ---------------------------------------------------------------------------------------------
def test_loop_restores_model_state_and_clips_pixels(model, cfg):
    model.train()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    model.head.weight.requires_grad_(True)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = synthesize(model, cfg, "spdfq", small(), progress=False)
    assert model.training
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert model.head.weight.requires_grad and not model.blocks[0].attn.qkv.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    lo, hi = valid_range(cfg)
    assert res.images.shape == (4, 3, 32, 32) and res.images.dtype == torch.float32
    assert (res.images >= lo - 1e-6).all() and (res.images <= hi + 1e-6).all()
    assert len(res.history) == 8 and [h["iteration"] for h in res.history] == list(range(1, 9))
    assert {"apa", "sl", "msr", "tv", "total"} <= set(res.history[0])
    assert res.history[0]["total"] == pytest.approx(sum(res.history[0][k] for k in ("apa", "sl", "msr", "tv")))


def test_same_seed_same_images_other_seed_other_images(model, cfg):
    a = synthesize(model, cfg, "psaq", small(iterations=3), progress=False)
    b = synthesize(model, cfg, "psaq", small(iterations=3), progress=False)
    c = synthesize(model, cfg, "psaq", small(iterations=3, seed=2), progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_micro_batches_give_the_same_objective(model, cfg):
    whole = synthesize(model, cfg, "spdfq", small(iterations=4), progress=False)
    parts = synthesize(model, cfg, "spdfq", small(iterations=4, batch_size=3), progress=False)
    for h1, h2 in zip(whole.history, parts.history, strict=True):
        assert h1["total"] == pytest.approx(h2["total"], rel=1e-4)
    assert torch.allclose(whole.images, parts.images, atol=1e-3)


def _student(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    s = copy.deepcopy(model)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return s


@pytest.mark.parametrize("method", ["psaq", "spdfq", "dfqvit"])
def test_resume_equals_an_uninterrupted_run(model, cfg, tmp_path, method):
    extra = {"student": _student(model)} if method == "dfqvit" else {}
    opts = small(iterations=12, **extra)  # dfqvit: global 0..3, detail 4..9, hard 10..11
    full = synthesize(model, cfg, method, opts, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    first = synthesize(model, cfg, method, opts, progress=False, checkpoint_path=ckpt, checkpoint_every=4, stop_after=6)
    assert not first.complete and first.iteration == 6 and load_checkpoint(ckpt)["iteration"] == 6
    rest = synthesize(model, cfg, method, opts, progress=False, checkpoint_path=ckpt, checkpoint_every=4, resume=True)
    assert rest.complete and rest.iterations_run == 6
    assert torch.equal(rest.images, full.images)
    assert torch.equal(rest.targets, full.targets)
    assert rest.history == full.history


def test_nan_stops_with_the_term_name_and_keeps_the_last_checkpoint(model, cfg, tmp_path, monkeypatch):
    real = psaq_mod.patch_similarity_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(psaq_mod, "patch_similarity_entropy", poisoned)
    ckpt = tmp_path / "checkpoint.pt"
    opts = small(iterations=10)
    with pytest.raises(DfqError, match=r"loss term 'entropy' became nan at iteration 7.*iteration 5\) is kept"):
        synthesize(model, cfg, "psaq", opts, progress=False, checkpoint_path=ckpt, checkpoint_every=5)
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 5 and len(state["history"]) == 5
    assert all(math.isfinite(h["total"]) for h in state["history"])
    assert torch.isfinite(state["params"]).all()
    # the run continues from the last good checkpoint, as if nothing had happened
    monkeypatch.setattr(psaq_mod, "patch_similarity_entropy", real)
    resumed = synthesize(model, cfg, "psaq", opts, progress=False, checkpoint_path=ckpt, resume=True)
    full = synthesize(model, cfg, "psaq", opts, progress=False)
    assert torch.equal(resumed.images, full.images)


def test_resume_refuses_other_settings(model, cfg, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    synthesize(model, cfg, "psaq", small(), progress=False, checkpoint_path=ckpt, stop_after=2)
    with pytest.raises(DfqError, match="--iters 8"):
        synthesize(model, cfg, "psaq", small(iterations=9), progress=False, checkpoint_path=ckpt, resume=True)
    with pytest.raises(DfqError, match="seed"):
        synthesize(model, cfg, "psaq", small(seed=5), progress=False, checkpoint_path=ckpt, resume=True)
    with pytest.raises(DfqError, match="method 'psaq'"):
        synthesize(model, cfg, "dfqvit", small(), progress=False, checkpoint_path=ckpt, resume=True)
    other = sharpen_(create_model(ModelSpec("deit_t", kwargs=dict(TINY), random_weights=True)), seed=9)
    with pytest.raises(DfqError, match="different model"):
        synthesize(other, cfg, "psaq", small(), progress=False, checkpoint_path=ckpt, resume=True)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(DfqError, match="could not be read"):
        synthesize(model, cfg, "psaq", small(), progress=False, checkpoint_path=ckpt, resume=True)


def test_checkpoint_from_before_an_option_existed_resumes_with_its_replay_value(model, cfg, tmp_path):
    from dfq_deploy.synth.checkpoint import save_checkpoint

    ckpt = tmp_path / "checkpoint.pt"
    old = small(crops_per_step=0)  # what spdfq did before crops_per_step existed
    synthesize(model, cfg, "spdfq", old, progress=False, checkpoint_path=ckpt, stop_after=3)
    saved = load_checkpoint(ckpt)
    del saved["options"]["crops_per_step"]  # as written by that older version
    save_checkpoint(ckpt, saved)
    with pytest.raises(DfqError, match=r"crops_per_step: 0 -> 1"):  # the default now differs: say which value
        synthesize(model, cfg, "spdfq", small(), progress=False, checkpoint_path=ckpt, resume=True)
    resumed = synthesize(model, cfg, "spdfq", old, progress=False, checkpoint_path=ckpt, resume=True)
    assert torch.equal(resumed.images, synthesize(model, cfg, "spdfq", old, progress=False).images)


def test_progress_bar_shows_terms_and_throughput(model, cfg, capsys):
    synthesize(model, cfg, "psaq", small(iterations=2), progress=True)
    err = capsys.readouterr().err
    assert "synth psaq" in err and "entropy=" in err and "img/s=" in err
    synthesize(model, cfg, "psaq", small(iterations=2), progress=False)
    assert "synth psaq" not in capsys.readouterr().err


def test_registered_source_reads_request_options(model, cfg):
    req = CalibRequest(3, 4, cfg, options={"iterations": 2, "progress": False, "kde_points": 8})
    calib = get_source("psaq")(model, req)
    assert calib.images.shape == (3, 3, 32, 32) and calib.targets.shape == (3, 10)
    assert calib.meta["source"] == "psaq" and calib.meta["seed"] == 4 and calib.meta["options"]["kde_points"] == 8
    with pytest.raises(DfqError, match="unknown option"):
        get_source("psaq")(model, CalibRequest(2, 0, cfg, options={"alpha1": 1.0}))


def test_non_vit_models_are_refused(cfg):
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )
    with pytest.raises(DfqError, match="ViT, DeiT or Swin"):
        synthesize(conv, cfg, "psaq", small(), progress=False)


# --- the output folder ------------------------------------------------------------------------------------
def test_run_synthesis_writes_a_loadable_folder(model, cfg, tmp_path):
    out = tmp_path / "synth"
    calib = synthesize_to_dir(
        model,
        cfg,
        "spdfq",
        num_samples=5,
        iters=6,
        output_dir=out,
        seed=2,
        progress=False,
        checkpoint_every=4,
        model_info={"name": "deit_t"},
    )
    for f in ("images.safetensors", "config.json", "loss.json", "contact_sheet.png", "loss.png", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    tensors = load_file(str(out / "images.safetensors"))
    assert tensors["images"].shape == (5, 3, 32, 32) and tensors["images"].dtype == torch.float32
    assert tensors["targets"].shape == (5, 10) and tensors["targets"].dtype == torch.float32
    assert torch.allclose(tensors["targets"].sum(1), torch.ones(5), atol=1e-5)
    assert torch.equal(tensors["images"], calib.images)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "spdfq" and config["seed"] == 2 and config["iterations"] == 6
    assert config["options"]["alpha1"] == 1e5 and config["options"]["num_samples"] == 5
    assert config["data_config"]["input_size"] == [3, 32, 32] and config["model"] == {"name": "deit_t"}
    loss = json.loads((out / "loss.json").read_text())
    assert loss["iteration"] == list(range(1, 7)) and set(loss["terms"]) == {"total", "apa", "sl", "msr", "tv"}
    assert all(len(v) == 6 for v in loss["terms"].values())
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.mode == "RGB" and sheet.size[0] >= 3 * 64
    assert Image.open(out / "loss.png").size[0] > 100
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 6

    back = load_synth_dir(out, cfg)
    assert torch.equal(back.images, calib.images) and torch.equal(back.targets, calib.targets)
    assert back.meta["method"] == "spdfq" and back.meta["iterations"] == 6

    with pytest.raises(DfqError, match="--resume"):
        synthesize_to_dir(model, cfg, "spdfq", num_samples=5, iters=6, output_dir=out, seed=2, progress=False)
    again = synthesize_to_dir(
        model, cfg, "spdfq", num_samples=5, iters=6, output_dir=out, seed=2, progress=False, resume=True
    )
    assert torch.equal(again.images, calib.images)


def test_run_synthesis_resume_finishes_an_interrupted_folder(model, cfg, tmp_path):
    out = tmp_path / "synth"
    part = synthesize_to_dir(model, cfg, "psaq", num_samples=3, iters=6, output_dir=out, progress=False, stop_after=3)
    assert part.meta["complete"] is False
    with pytest.raises(DfqError, match=r"has not finished \(iteration 3/6, method psaq\).*--resume"):
        load_synth_dir(out)
    done = synthesize_to_dir(model, cfg, "psaq", num_samples=3, iters=6, output_dir=out, progress=False, resume=True)
    ref = synthesize_to_dir(model, cfg, "psaq", num_samples=3, iters=6, output_dir=tmp_path / "ref", progress=False)
    assert torch.equal(done.images, ref.images)
    assert torch.equal(load_synth_dir(out).images, ref.images)


def test_load_synth_dir_reports_clear_errors(model, cfg, tmp_path):
    with pytest.raises(DfqError, match="does not exist"):
        load_synth_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfqError, match="images.safetensors is missing"):
        load_synth_dir(tmp_path / "empty")
    out = tmp_path / "synth"
    synthesize_to_dir(model, cfg, "psaq", num_samples=2, iters=2, output_dir=out, progress=False)
    other_cfg = dict(cfg, input_size=(3, 64, 64))
    with pytest.raises(DfqError, match="the model takes"):
        load_synth_dir(out, other_cfg)
    with pytest.raises(DfqError, match="normalised with mean"):
        load_synth_dir(out, dict(cfg, mean=(0.5, 0.5, 0.5)))
    (out / "config.json").write_text("{not json")
    with pytest.raises(DfqError, match="config.json is corrupt"):
        load_synth_dir(out)
    synthesize_to_dir(model, cfg, "psaq", num_samples=2, iters=2, output_dir=out, progress=False, resume=True)
    (out / "images.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DfqError, match="images.safetensors is corrupt"):
        load_synth_dir(out)


def test_loss_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    history = [{"iteration": 1, "stage": "main", "lr": 0.1, "total": 1.0}]
    with caplog.at_level("WARNING"):
        assert write_loss_plot(history, tmp_path / "loss.png") is None
    assert "matplotlib is not installed" in caplog.text
    assert not Path(tmp_path / "loss.png").exists()


def test_dfqvit_builtin_student_resumes_inside_the_hard_stage(model, cfg, tmp_path):
    # hard stage 10..19 with refresh every 4 steps: stop at 16, between two refits, so the resumed run must
    # take the student's scales from the checkpoint to match
    opts = small(iterations=20, hard_frac=0.5, global_frac=0.2, hard_student="W4A4", student_refresh=4)
    full = synthesize(model, cfg, "dfqvit", opts, progress=False)
    assert [s["name"] for s in full.info["stages"]] == ["global", "detail", "hard"]
    assert full.info["student"] == "W4A4"
    ckpt = tmp_path / "checkpoint.pt"
    synthesize(model, cfg, "dfqvit", opts, progress=False, checkpoint_path=ckpt, checkpoint_every=0, stop_after=16)
    scales = load_checkpoint(ckpt)["state"]["student.scales"]
    assert scales.numel() > 0 and bool((scales > 0).all())
    rest = synthesize(model, cfg, "dfqvit", opts, progress=False, checkpoint_path=ckpt, resume=True)
    assert torch.equal(rest.images, full.images)
    assert rest.history == full.history


def test_dfqvit_hard_student_must_name_a_quantization(model, cfg):
    with pytest.raises(DfqError, match="W9A9"):
        synthesize(model, cfg, "dfqvit", small(hard_student="W9A9"), progress=False)


def test_dfqvit_adversarial_hard_stage_raises_the_students_disagreement(model, cfg):
    from dfq_deploy.quant.student import QuantStudent
    from dfq_deploy.synth.dfqvit import student_config

    student = QuantStudent(model, student_config("W4A3"))  # a fixed student: ranges from noise images
    student.calibrate(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)))

    def disagreement(images: torch.Tensor) -> float:
        with torch.no_grad():
            log_p = torch.log_softmax(model(images), -1)
            log_q = torch.log_softmax(student(images), -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    # a still objective (no jitter/flip) and 18 hard steps: the KL goes from ~0.2 to ~8 on random models
    base = small(iterations=24, hard_frac=0.75, global_frac=0.0, student=student, jitter=0, flip=False)
    plain = synthesize(model, cfg, "dfqvit", base, progress=False)
    adv = synthesize(model, cfg, "dfqvit", {**base, "hard_adversarial": 5.0}, progress=False)
    assert "adversarial" in adv.history[-1] and "adversarial" not in plain.history[-1]
    assert disagreement(adv.images) > 5 * disagreement(plain.images)
