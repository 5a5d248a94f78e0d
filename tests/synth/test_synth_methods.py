"""The three data-free synthesizers: their losses, priors, crops, targets and curriculum."""

from __future__ import annotations

import math

import pytest
import torch

from dfq_deploy.models import ModelSpec, create_model, data_config
from dfq_deploy.synth import synthesize
from dfq_deploy.synth.attn import AttnBlock
from dfq_deploy.synth.dfqvit import DfqvitOptions, detail_targets, disagreement_weights, easy_targets
from dfq_deploy.synth.psaq import kde_differential_entropy
from dfq_deploy.synth.spdfq import (
    apa_blocks,
    crop_views,
    default_alpha1,
    flip_prior,
    pick_semantics,
    random_attention_priors,
    sample_crop_boxes,
    soft_targets,
)
from tests.synth.test_synth import TINY, sharpen_

# a fixed objective (no jitter/flip) makes "the loss goes down" a deterministic property, not a noisy one
STILL = {"jitter": 0, "flip": False}
SWIN = {
    "img_size": 32,
    "patch_size": 2,
    "window_size": 4,
    "depths": (1, 1),
    "embed_dim": 24,
    "num_heads": (1, 2),
    "num_classes": 10,
}


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return sharpen_(create_model(ModelSpec("deit_t", kwargs=dict(TINY), random_weights=True)))


@pytest.fixture(scope="module")
def swin() -> torch.nn.Module:
    return sharpen_(create_model(ModelSpec("swin_t", kwargs=dict(SWIN), random_weights=True)))


def start_end(history: list[dict], key: str = "total", stage: str | None = None, k: int = 3) -> tuple[float, float]:
    vals = [h[key] for h in history if stage is None or h["stage"] == stage]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


# --- losses go down ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_psaq_lowers_its_loss_and_raises_patch_entropy(vit, seed):
    res = synthesize(
        vit, data_config(vit), "psaq", {"num_samples": 6, "iterations": 20, "seed": seed, **STILL}, progress=False
    )
    start, end = start_end(res.history)
    assert end < start - 1.0
    ent0, ent1 = start_end(res.history, "entropy")
    assert ent1 < ent0  # the term is -entropy: patch similarities got more diverse
    ce0, ce1 = start_end(res.history, "ce")
    assert ce1 < ce0
    assert torch.equal(res.targets.argmax(1), res.targets.argmax(1)) and torch.all(res.targets.sum(1) == 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_spdfq_lowers_its_loss_and_aligns_attention(vit, seed):
    res = synthesize(
        vit, data_config(vit), "spdfq", {"num_samples": 6, "iterations": 20, "seed": seed, **STILL}, progress=False
    )
    start, end = start_end(res.history)
    assert end < 0.6 * start
    apa0, apa1 = start_end(res.history, "apa")
    assert apa1 < 0.6 * apa0
    for term in ("sl", "msr"):
        a, b = start_end(res.history, term)
        assert b < a, term


def test_spdfq_runs_on_swin_with_window_priors(swin):
    cfg = data_config(swin)
    res = synthesize(swin, cfg, "spdfq", {"num_samples": 4, "iterations": 16, "seed": 0, **STILL}, progress=False)
    assert res.options.lr == 0.25 and res.options.alpha1 == 10.0  # Swin learning rate, Swin-S/T APA weight
    assert res.info["apa_blocks"] == [{"block": 1, "weight": 0.5}, {"block": 2, "weight": 1.0}]
    start, end = start_end(res.history)
    assert end < start - 0.5
    assert res.images.shape == (4, 3, 32, 32)


def test_spdfq_swin_priors_are_per_window_and_use_mean_attention(swin):
    from dfq_deploy.synth.method import synthesis_mode
    from dfq_deploy.synth.spdfq import Spdfq, SpdfqOptions

    with synthesis_mode(swin):
        m = Spdfq(swin, data_config(swin), SpdfqOptions(num_samples=3))
        m.init_state(torch.Generator().manual_seed(0))
    # stage 1: 16x16 tokens in 4x4 windows -> 16 windows, 1 head; stage 2: 8x8 tokens -> 4 windows, 2 heads
    assert [(b.windows, b.num_heads, b.grid, b.has_cls) for b in m.blocks] == [
        (16, 1, (4, 4), False),
        (4, 2, (4, 4), False),
    ]
    assert m.state["prior.0"].shape == (3, 16, 1, 16) and m.state["prior.1"].shape == (3, 4, 2, 16)
    assert torch.allclose(m.state["prior.1"].sum(-1), torch.ones(3, 4, 2), atol=1e-5)  # x = 0 for Swin


def test_psaq_runs_on_swin(swin):
    res = synthesize(swin, data_config(swin), "psaq", {"num_samples": 4, "iterations": 12, **STILL}, progress=False)
    start, end = start_end(res.history)
    assert end < start - 0.5


def test_dfqvit_curriculum_goes_from_low_resolution_to_detail(vit):
    cfg = data_config(vit)
    res = synthesize(vit, cfg, "dfqvit", {"num_samples": 6, "iterations": 30, "seed": 0, **STILL}, progress=False)
    stages = res.info["stages"]
    assert [(s["name"], s["start"], s["end"]) for s in stages] == [("global", 0, 9), ("detail", 9, 30)]
    assert [h["stage"] for h in res.history] == ["global"] * 9 + ["detail"] * 21
    assert "entropy" not in res.history[0] and "entropy" in res.history[-1]
    for stage in ("global", "detail"):
        a, b = start_end(res.history, stage=stage)
        assert b < a - 0.3, stage
    assert res.info["student"] is None
    # targets: the detail targets, a main class within detail_confidence and 1-2 secondary classes
    t = res.targets
    assert torch.allclose(t.sum(1), torch.ones(6), atol=1e-5)
    assert ((t.max(1).values >= 0.4 - 1e-6) & (t.max(1).values <= 0.7 + 1e-6)).all()


def test_dfqvit_global_stage_optimises_a_low_resolution_image(vit):
    cfg = data_config(vit)
    res = synthesize(
        vit, cfg, "dfqvit", {"num_samples": 2, "iterations": 10, "global_frac": 0.5, **STILL}, progress=False
    )
    assert res.images.shape == (2, 3, 32, 32)
    # stop inside the global stage: the images are 8x8 parameters upsampled, hence smooth
    early = synthesize(
        vit,
        cfg,
        "dfqvit",
        {"num_samples": 2, "iterations": 10, "global_frac": 0.5, **STILL},
        progress=False,
        stop_after=3,
    )
    from dfq_deploy.synth.priors import total_variation

    assert early.images.shape == (2, 3, 32, 32)
    assert total_variation(early.images) < 0.25 * total_variation(torch.randn(2, 3, 32, 32))


def test_dfqvit_hard_stage_weights_images_the_student_gets_wrong(vit):
    import copy

    student = copy.deepcopy(vit)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    calls = []

    def student_fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return student(x)

    res = synthesize(
        vit, data_config(vit), "dfqvit", {"num_samples": 4, "iterations": 10, "student": student_fn}, progress=False
    )
    assert [s["name"] for s in res.info["stages"]] == ["global", "detail", "hard"]
    assert res.info["stages"][-1]["start"] == 8 and res.info["student"] == "callable"
    assert len(calls) == 2 and calls[0] == (4, 3, 32, 32)  # once per hard-stage step, on all images


def test_disagreement_weights_grow_with_kl():
    fp = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    st = torch.tensor([[4.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 4.0, 0.0]])
    w = disagreement_weights(fp, st, gamma=1.0)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] < w[1] < w[2]
    assert torch.allclose(disagreement_weights(fp, fp, gamma=1.0), torch.ones(3))


def test_dfqvit_targets():
    labels = torch.tensor([0, 3, 9, 5])
    easy = easy_targets(labels, 10, 0.9)
    assert torch.allclose(easy.sum(1), torch.ones(4)) and torch.equal(easy.argmax(1), labels)
    assert torch.allclose(easy[0, 0], torch.tensor(0.9))
    opts = DfqvitOptions()
    det = detail_targets(labels, 10, opts, torch.Generator().manual_seed(0))
    assert torch.allclose(det.sum(1), torch.ones(4), atol=1e-6) and torch.equal(det.argmax(1), labels)
    n_secondary = (det > opts.background / 10 + 1e-6).sum(1) - 1
    assert ((n_secondary >= 1) & (n_secondary <= 2)).all()


# --- PSAQ pieces ------------------------------------------------------------------------------------------
def test_kde_entropy_matches_a_gaussian_and_prefers_spread():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4000, generator=g) * torch.tensor([[0.1], [0.4]])
    h = kde_differential_entropy(x, points=64)
    exact = 0.5 * torch.log(2 * math.pi * math.e * torch.tensor([0.01, 0.16]))
    assert torch.allclose(h, exact, atol=0.05)
    assert h[1] > h[0]
    x.requires_grad_(True)
    kde_differential_entropy(x, points=16).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- SPDFQ pieces -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (4, 4), (7, 5)])
def test_attention_priors_shape_sign_and_mass(grid):
    gen = torch.Generator().manual_seed(0)
    prior, x = random_attention_priors(500, grid, gen)
    assert prior.shape == (500, grid[0] * grid[1]) and x.shape == (500,)
    assert (prior >= 0).all() and ((x >= 0) & (x < 1)).all()
    assert torch.allclose(prior.sum(-1), 1 - x, atol=1e-5)
    no_cls, x0 = random_attention_priors(50, grid, gen, cls_share=False)
    assert torch.equal(x0, torch.zeros(50)) and torch.allclose(no_cls.sum(-1), torch.ones(50), atol=1e-5)
    # peaked, not flat: the maximum is well above the mean
    assert (prior.max(-1).values > 2 * prior.mean(-1)).float().mean() > 0.9
    again, _ = random_attention_priors(500, grid, torch.Generator().manual_seed(0))
    assert torch.equal(again, prior)


def test_attention_priors_have_up_to_five_blobs():
    prior, _ = random_attention_priors(400, (14, 14), torch.Generator().manual_seed(1))
    grid = prior.view(-1, 1, 14, 14)
    pooled = torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1)
    peaks = ((grid == pooled) & (grid > 0.2 * grid.amax(dim=(2, 3), keepdim=True))).flatten(1).sum(1)
    assert peaks.min() >= 1 and peaks.max() <= 5 + 2  # ties on plateaus aside
    assert (peaks > 1).any()


def test_apa_uses_the_second_half_of_the_blocks():
    blocks = [AttnBlock(i, "vit", 3, 65, 1, (8, 8), 1, True) for i in range(12)]
    sel = apa_blocks(blocks)
    assert [b.index + 1 for b, _ in sel] == list(range(6, 13))
    assert [w for _, w in sel] == pytest.approx([layer / 12 for layer in range(6, 13)])
    assert [b.index for b, _ in apa_blocks(blocks[:2])] == [0, 1]


def test_flip_prior_mirrors_columns_and_swin_windows():
    vit_block = AttnBlock(0, "vit", 1, 5, 1, (2, 2), 1, True)
    p = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    assert flip_prior(p, vit_block).flatten().tolist() == [2.0, 1.0, 4.0, 3.0]
    swin_block = AttnBlock(0, "swin", 1, 4, 4, (2, 2), 0, False)
    q = torch.arange(16.0).view(1, 4, 1, 4)  # 2x2 windows of 2x2 tokens
    image = q.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)  # window grid -> pixel layout
    flipped = flip_prior(q, swin_block).view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
    assert torch.equal(flipped, image.flip(-1))


def test_default_alpha1_follows_the_paper(vit, swin):
    assert default_alpha1(vit)[0] == 1e5
    assert default_alpha1(swin)[0] == 10.0
    small = create_model(ModelSpec("vit_s", kwargs={"img_size": 32, "patch_size": 8, "depth": 1}, random_weights=True))
    assert default_alpha1(small)[0] == 1.0
    assert default_alpha1(torch.nn.Linear(2, 2))[0] == 1e5


def test_msr_crops_are_disjoint_and_gradients_stay_inside():
    gen = torch.Generator().manual_seed(0)
    n = 64
    quadrants = torch.rand((n, 4), generator=gen).argsort(1)
    boxes = sample_crop_boxes(quadrants, (32, 30), (0.5, 1.0), gen)
    for i in range(n):
        masks = []
        for j in range(4):
            y0, y1, x0, x1 = boxes[i, j].tolist()
            q = int(quadrants[i, j])
            qy, qx = (0, 16) if q // 2 == 0 else (16, 32), (0, 15) if q % 2 == 0 else (15, 30)
            assert qy[0] <= y0 < y1 <= qy[1] and qx[0] <= x0 < x1 <= qx[1]
            assert (y1 - y0) >= 8 and (x1 - x0) >= 7  # at least half the quadrant side (rounded)
            mask = torch.zeros(32, 30, dtype=torch.bool)
            mask[y0:y1, x0:x1] = True
            masks.append(mask)
        assert (torch.stack(masks).sum(0) <= 1).all()  # no pixel in two crops

    images = torch.randn(3, 3, 32, 30, requires_grad=True)
    select = pick_semantics(torch.tensor([4, 1, 2]), 4, 0, gen)  # all of them
    flips = torch.tensor([[True, False, True, False]] * 3)
    crops, owner, slot = crop_views(images, boxes[:3], select, flips)
    assert crops.shape == (7, 3, 32, 30)
    assert owner.tolist() == [0, 0, 0, 0, 1, 2, 2] and slot.tolist() == [0, 1, 2, 3, 0, 0, 1]
    for k in range(len(crops)):
        (grad,) = torch.autograd.grad(crops[k].square().sum(), images)
        i, j = int(owner[k]), int(slot[k])
        y0, y1, x0, x1 = boxes[i, j].tolist()
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[i, :, y0:y1, x0:x1] = True
        assert grad[~inside].abs().max() == 0  # nothing outside the crop of that image
        assert grad[inside].abs().min() > 0


def test_pick_semantics_is_uniform_over_an_images_own_semantics():
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([1, 2, 3, 4] * 500)
    for per_step in (1, 2):
        hits = torch.zeros(len(counts), 4)
        for _ in range(40):
            sel = pick_semantics(counts, 4, per_step, gen)
            assert (sel.sum(1) == counts.clamp(max=per_step)).all()  # min(per_step, m) crops per image
            assert not sel[torch.arange(4)[None, :] >= counts[:, None]].any()  # never a slot beyond m
            hits += sel
        for m in (2, 3, 4):  # every own slot equally often: P = min(k, m) / m
            share = hits[counts == m][:, :m].sum(0) / (40 * 500)
            assert torch.allclose(share, torch.full((m,), min(per_step, m) / m), atol=0.03)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pick_semantics(torch.ones(8, dtype=torch.long), 4, 1, a)
    pick_semantics(torch.full((8,), 4), 4, 1, b)
    assert a.get_state().equal(b.get_state())  # the draws do not depend on the counts (resume, replay)
    state = gen.get_state()
    assert pick_semantics(counts, 4, 0, gen).equal(torch.arange(4)[None, :] < counts[:, None])
    assert gen.get_state().equal(state)  # all crops: no draw, so old runs replay exactly


def test_one_crop_per_step_is_an_unbiased_estimate_of_the_all_crops_loss(vit):
    from dfq_deploy.synth.method import synthesis_mode
    from dfq_deploy.synth.spdfq import Spdfq, SpdfqOptions

    n = 6
    images = torch.randn(n, 3, 32, 32)
    with synthesis_mode(vit):
        m = Spdfq(vit, data_config(vit), SpdfqOptions(num_samples=n, alpha1=0.0))
        m.init_state(torch.Generator().manual_seed(0))
        sem = m.state["semantics"]
        ctx = {**m.step_context(0, m.stages()[0], images, torch.Generator().manual_seed(1)), "augment": (0, False)}
        assert ctx["select"].sum(1).tolist() == [1] * n  # default: one crop per image
        off = Spdfq(vit, data_config(vit), SpdfqOptions(num_samples=n, alpha1=0.0, msr=False))
        off.init_state(torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        assert off.step_context(0, off.stages()[0], images, gen)["select"] is None
        only_boxes = torch.Generator().manual_seed(1)  # without crops: the boxes and flips, nothing more
        sample_crop_boxes(off.state["quadrants"], (32, 32), off.opts.crop_scale, only_boxes)
        torch.rand(off.state["quadrants"].shape, generator=only_boxes)
        assert gen.get_state().equal(only_boxes.get_state())

        def msr(select: torch.Tensor) -> torch.Tensor:
            batches = []
            forward = m.model.forward
            m.model.forward = lambda x: (batches.append(x.shape[0]), forward(x))[1]
            try:
                with m.taps():
                    value = m.losses(images, images, slice(0, n), 0, m.stages()[0], {**ctx, "select": select})["msr"]
            finally:
                del m.model.forward
            assert batches == [n + int(select.sum())]  # the crops fed are the extra images, nothing more
            return value

        full = msr(torch.arange(4)[None, :] < sem[:, None])
        # every choice of the single crop, weighted by its probability 1/m, averages to the all-crops loss
        expected = torch.zeros(())
        for j in range(4):
            pick = torch.minimum(torch.full_like(sem, j), sem - 1)  # images with m <= j repeat their last slot
            select = torch.arange(4)[None, :] == pick[:, None]
            weight = torch.where(j < sem, 1.0 / sem.float(), 0.0)  # ... but those repeats weigh 0
            per_image = msr_per_image(m, images, select, ctx)
            expected = expected + (weight * per_image).sum() / n
        assert torch.isclose(full, expected, rtol=1e-5)

        # two crops per step: an image with m = 1 feeds one, the others two; each image averages its own crops
        two = pick_semantics(sem, 4, 2, torch.Generator().manual_seed(3))
        assert (sem == 1).any() and (sem > 1).any() and two.sum(1).tolist() == sem.clamp(max=2).tolist()
        per_image = []
        for i in range(n):
            crops = []
            for j in two[i].nonzero().flatten().tolist():
                only = torch.zeros_like(two)
                only[i, j] = True
                crops.append(image_msr(m, images, i, only, ctx))  # one crop: its soft cross-entropy, not averaged
            per_image.append(torch.stack(crops).mean())
        assert torch.isclose(msr(two), torch.stack(per_image).mean(), rtol=1e-5)


def image_msr(m, images: torch.Tensor, i: int, select: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Image ``i``'s MSR loss on its own (the idx slice picks its row of ``select``, which needs a crop)."""
    with m.taps():
        return m.losses(images[i : i + 1], images[i : i + 1], slice(i, i + 1), 0, m.stages()[0],
                        {**ctx, "select": select})["msr"]


def msr_per_image(m, images: torch.Tensor, select: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Each image's MSR loss on its own (the method's "msr" term is their mean); every image needs a crop."""
    return torch.stack([image_msr(m, images, i, select, ctx) for i in range(images.shape[0])])


def test_soft_targets_raise_the_chosen_classes():
    gen = torch.Generator().manual_seed(0)
    classes = torch.tensor([[3, 7, 1, 0], [5, 2, 8, 9]])
    active = torch.tensor([[True, True, False, False], [True, False, False, False]])
    t = soft_targets(classes, active, 10, (5.0, 10.0), gen)
    assert torch.allclose(t.sum(-1), torch.ones(2))
    assert set(t[0].topk(2).indices.tolist()) == {3, 7} and t[1].argmax() == 5
    assert t[0, [3, 7]].sum() > 0.9 and t[1, 5] > 0.9
    assert t[0, 1] < 0.05  # an inactive slot's class is not raised


def test_spdfq_semantics_targets_and_quadrants(vit):
    from dfq_deploy.synth.method import synthesis_mode
    from dfq_deploy.synth.spdfq import Spdfq, SpdfqOptions

    with synthesis_mode(vit):
        m = Spdfq(vit, data_config(vit), SpdfqOptions(num_samples=40))
        m.init_state(torch.Generator().manual_seed(0))
    sem, classes, quads = m.state["semantics"], m.state["classes"], m.state["quadrants"]
    assert sem.min() == 1 and sem.max() == 4 and len(set(sem.tolist())) == 4  # m ~ U{1..4}
    for i in range(40):
        k = int(sem[i])
        assert len(set(classes[i].tolist())) == 4 and len(set(quads[i].tolist())) == 4
        # the full image's target raises exactly its k classes; each crop's target only its own class
        assert set(m.state["targets"][i].topk(k).indices.tolist()) == set(classes[i, :k].tolist())
        assert m.state["targets"][i, classes[i, :k]].sum() > 0.9
        assert torch.equal(m.state["crop_targets"][i].argmax(-1), classes[i])
    assert torch.allclose(m.state["crop_targets"].sum(-1), torch.ones(40, 4))
    # ViT priors: one per image and head of blocks 1..2 (L = 2), summing to 1 - x < 1
    assert m.state["prior.1"].shape == (40, 1, 3, 64)
    sums = m.state["prior.1"].sum(-1)
    assert ((sums > 0) & (sums <= 1)).all() and sums.std() > 0.1


def test_spdfq_sums_its_apa_loss_over_heads(vit):
    """The paper's APA loss is a sum over heads; revision 1 averaged (1/H of the weight)."""
    common = {"num_samples": 2, "iterations": 1, "seed": 0, "msr": False, **STILL}
    summed = synthesize(vit, data_config(vit), "spdfq", common, progress=False)
    mean = synthesize(vit, data_config(vit), "spdfq", {**common, "apa_head_sum": False}, progress=False)
    heads = vit.blocks[0].attn.num_heads
    assert heads > 1
    assert summed.history[0]["apa"] == pytest.approx(heads * mean.history[0]["apa"], rel=1e-5)
