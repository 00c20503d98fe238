"""Draft-training math against hand-computed values: the loss, the input-feature noise,
the curriculum r(e) and its sampler, the optimiser schedule (MSD_SPEC.md 4)."""

from __future__ import annotations

import math

import pytest
import torch

from msd.train.curriculum import CurriculumSampler, multimodal_probability
from msd.train.losses import feature_noise, msd_loss, top1_accuracy
from msd.train.optim import GRAD_CLIP, make_optimizer, make_schedule

# ---------------------------------------------------------------------------- loss
# H = 2, N = 3, V = 3; W h = [h0, h1, h0 + h1]. Position 2 is masked out and holds values
# that would change every term if it leaked in.
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
DRAFT = torch.tensor([[[0.5, 0.0], [1.0, 0.0], [9.0, -7.0]]])
TARGET = torch.tensor([[[0.0, 0.0], [0.0, 3.0], [-5.0, 4.0]]])
MASK = torch.tensor([[1, 1, 0]])


def lm_head(hidden):
    return hidden @ W.T


def test_loss_against_hand_computed_values():
    draft = DRAFT.clone().requires_grad_(True)
    target = TARGET.clone().requires_grad_(True)
    terms = msd_loss(draft, target, lm_head, MASK)

    # SmoothL1 (beta 1): 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise; mean over the 2 dims.
    sl1_t0 = (0.5 * 0.5**2 + 0.0) / 2  # d = (0.5, 0)
    sl1_t1 = ((1 - 0.5) + (3 - 0.5)) / 2  # d = (1, -3)
    assert terms.vloss.item() == pytest.approx((sl1_t0 + sl1_t1) / 2)
    assert terms.vloss.item() == pytest.approx(0.78125)

    # t0: draft logits (0.5, 0, 0.5), target logits (0, 0, 0) -> uniform target.
    ce_t0 = math.log(2 * math.exp(0.5) + 1) - (0.5 + 0 + 0.5) / 3
    # t1: draft logits (1, 0, 1), target logits (0, 3, 3) -> p = (1, e^3, e^3) / (1 + 2 e^3).
    p = [1 / (1 + 2 * math.exp(3)), math.exp(3) / (1 + 2 * math.exp(3)), math.exp(3) / (1 + 2 * math.exp(3))]
    ce_t1 = math.log(2 * math.e + 1) - (p[0] * 1 + p[2] * 1)
    assert terms.ploss.item() == pytest.approx((ce_t0 + ce_t1) / 2)
    assert terms.loss.item() == pytest.approx(1.0 * terms.vloss.item() + 0.1 * terms.ploss.item())
    # argmax: t0 draft 0 (first of the tie) = target 0 (tie); t1 draft 0 != target 1.
    assert terms.accuracy.item() == pytest.approx(0.5)
    assert terms.tokens.item() == 2

    terms.loss.backward()
    assert target.grad is None  # the target side carries no gradient
    assert torch.equal(draft.grad[0, 2], torch.zeros(2))  # the masked position gets none
    assert torch.isfinite(draft.grad).all()


def test_loss_weights_are_configurable():
    terms = msd_loss(DRAFT, TARGET, lm_head, MASK, v_weight=2.0, p_weight=0.5)
    assert terms.loss.item() == pytest.approx(2.0 * terms.vloss.item() + 0.5 * terms.ploss.item())


def test_loss_is_per_token_not_per_sample():
    """Two samples: the denominator is the total mask, so a long answer weighs more."""
    draft = torch.cat([DRAFT, DRAFT])
    target = torch.cat([TARGET, TARGET])
    mask = torch.tensor([[1, 0, 0], [0, 1, 0]])
    sl1_t0, sl1_t1 = 0.0625, 1.5
    assert msd_loss(draft, target, lm_head, mask).vloss.item() == pytest.approx((sl1_t0 + sl1_t1) / 2)
    assert msd_loss(draft, target, lm_head, mask.bool()).vloss.item() == pytest.approx((sl1_t0 + sl1_t1) / 2)


def test_empty_mask_gives_zeros_not_nan():
    draft = DRAFT.clone().requires_grad_(True)
    terms = msd_loss(draft, TARGET, lm_head, torch.zeros(1, 3))
    for value in terms:
        assert value.item() == 0.0
    terms.loss.backward()
    assert torch.equal(draft.grad, torch.zeros_like(draft))


def test_loss_in_bfloat16_is_computed_in_float32():
    terms = msd_loss(DRAFT.bfloat16(), TARGET.bfloat16(), lambda h: lm_head(h.float()).bfloat16(), MASK)
    assert terms.ploss.dtype == torch.float32
    assert terms.vloss.item() == pytest.approx(0.78125)


def test_top1_accuracy():
    draft = torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert top1_accuracy(draft, target).item() == pytest.approx(2 / 3)
    assert top1_accuracy(draft, target, torch.tensor([0, 0, 1])).item() == 0.0
    assert top1_accuracy(draft, target, torch.tensor([0, 0, 0])).item() == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape mismatch"):
        msd_loss(DRAFT, TARGET[:, :2], lm_head, MASK)


# ---------------------------------------------------------------------------- noise
def test_noise_statistics_per_sample_length():
    lengths, n_max, hidden = (64, 16), 64, 256
    mask = torch.arange(n_max)[None] < torch.tensor(lengths)[:, None]
    features = torch.full((2, n_max, hidden), 3.0)
    noisy = feature_noise(features, mask, torch.Generator().manual_seed(0))
    assert torch.equal(features, torch.full((2, n_max, hidden), 3.0))  # input untouched
    noise = noisy - 3.0
    for b, length in enumerate(lengths):
        width = 0.2 * 512 / length  # U(-width/2, width/2)
        values = noise[b, :length].flatten()
        std = width / math.sqrt(12)
        assert values.abs().max() <= width / 2
        assert values.abs().max() > 0.95 * width / 2  # the whole support is used
        assert abs(values.mean().item()) < 4 * std / math.sqrt(values.numel())
        assert values.std().item() == pytest.approx(std, rel=0.03)
        assert torch.equal(noise[b, length:], torch.zeros_like(noise[b, length:]))  # padding: none


def test_noise_without_mask_uses_the_full_length_and_keeps_dtype():
    features = torch.zeros(1, 32, 512, dtype=torch.bfloat16)
    noisy = feature_noise(features, generator=torch.Generator().manual_seed(1), scale=0.1)
    assert noisy.dtype == torch.bfloat16
    width = 0.1 * 512 / 32
    assert noisy.float().abs().max() <= width / 2 * (1 + 2**-8)  # bf16 rounding
    assert noisy.float().std().item() == pytest.approx(width / math.sqrt(12), rel=0.05)
    again = feature_noise(features, generator=torch.Generator().manual_seed(1), scale=0.1)
    assert torch.equal(noisy, again)


# ---------------------------------------------------------------------------- curriculum
@pytest.mark.parametrize("total, expected", [
    (1, [1.0]),
    (2, [0.0, 1.0]),
    (4, [0.0, 0.0, 0.5, 1.0]),
    (5, [0.0, 0.0, 0.2, 0.6, 1.0]),  # E/2 = 2.5: (3 - 2.5) / 2.5, (4 - 2.5) / 2.5
    (10, [0.0] * 5 + [0.2, 0.4, 0.6, 0.8, 1.0]),
])
def test_multimodal_probability_every_epoch(total, expected):
    got = [multimodal_probability(e, total) for e in range(1, total + 1)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("epoch, total", [(0, 4), (5, 4), (1, 0), (-1, 3)])
def test_multimodal_probability_bad_arguments(epoch, total):
    with pytest.raises(ValueError):
        multimodal_probability(epoch, total)


@pytest.mark.parametrize("epoch, total, r", [(1, 4, 0.0), (3, 4, 0.5), (4, 5, 0.6), (4, 4, 1.0)])
def test_sampler_multimodal_fraction(epoch, total, r):
    text, multimodal = 1500, 500
    indices = torch.tensor(list(CurriculumSampler(text, multimodal, epoch, total, seed=3)))
    assert len(indices) == text + multimodal
    assert ((indices >= 0) & (indices < text + multimodal)).all()
    fraction = (indices >= text).float().mean().item()
    assert abs(fraction - r) <= 4 * math.sqrt(r * (1 - r) / len(indices)) + 1e-12


def test_sampler_draws_each_kind_without_replacement_first():
    indices = list(CurriculumSampler(100, 50, 1, 4, seed=0, samples_per_epoch=100))
    assert sorted(indices) == list(range(100))  # r = 0: one permutation of the text
    indices = list(CurriculumSampler(100, 50, 4, 4, seed=0, samples_per_epoch=120))
    counts = torch.bincount(torch.tensor(indices) - 100, minlength=50)
    assert counts.min() == 2 and counts.max() == 3  # 120 draws of 50: every one twice first


def test_sampler_is_deterministic_given_seed_and_epoch():
    first = list(CurriculumSampler(300, 200, 3, 4, seed=7))
    assert first == list(CurriculumSampler(300, 200, 3, 4, seed=7))
    assert first != list(CurriculumSampler(300, 200, 3, 4, seed=8))
    sampler = CurriculumSampler(300, 200, 3, 4, seed=7)
    sampler.set_epoch(2)
    second = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and second != first


def test_sampler_ddp_shards_are_one_stream():
    ranks = [list(CurriculumSampler(70, 30, 3, 4, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [34, 34, 34]  # ceil(100 / 3)
    single = list(CurriculumSampler(70, 30, 3, 4, seed=1, samples_per_epoch=102))
    interleaved = [ranks[slot % 3][slot // 3] for slot in range(102)]
    assert interleaved == single  # disjoint slots of one global stream


def test_sampler_state_round_trip():
    sampler = CurriculumSampler(80, 40, 3, 4, seed=5, num_replicas=2, rank=1)
    full = list(sampler)
    state = sampler.state_dict(consumed=17)
    resumed = CurriculumSampler(80, 40, 1, 4, seed=5, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert list(resumed) == full[17:]
    assert resumed.state_dict(consumed=3)["start"] == 20
    resumed.set_epoch(4)
    sampler.set_epoch(4)
    assert list(resumed) == list(sampler)  # the next epoch starts from its beginning
    with pytest.raises(ValueError, match="seed"):
        CurriculumSampler(80, 40, 1, 4, seed=6, num_replicas=2, rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed"):
        sampler.state_dict(consumed=len(sampler) + 1)


def test_sampler_refuses_missing_data():
    with pytest.raises(ValueError, match="multimodal"):
        CurriculumSampler(10, 0, 3, 4, seed=0)
    with pytest.raises(ValueError, match="text"):
        CurriculumSampler(0, 10, 3, 4, seed=0)
    CurriculumSampler(10, 0, 2, 4, seed=0)  # stage 1 needs no multimodal data
    with pytest.raises(ValueError, match="rank"):
        CurriculumSampler(10, 10, 1, 4, seed=0, num_replicas=2, rank=2)


# ---------------------------------------------------------------------------- optimiser
def test_optimizer_defaults_skip_frozen_parameters():
    frozen, trained = torch.nn.Parameter(torch.zeros(2), requires_grad=False), torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([frozen, trained])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["params"] == [trained]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-5, (0.9, 0.95), 0.0)
    assert GRAD_CLIP == 0.5


def test_schedule_warmup_then_linear_decay():
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = make_schedule(optimizer, total_steps=30, warmup_steps=10)
    lrs = []
    for _ in range(31):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = {0: 0.0, 5: 0.5e-4, 10: 1e-4, 20: 0.5e-4, 25: 0.25e-4, 30: 0.0}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, abs=1e-12), step


@pytest.mark.parametrize("total, warmup", [(10, 11), (0, 0), (10, -1)])
def test_schedule_bad_arguments(total, warmup):
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError):
        make_schedule(optimizer, total_steps=total, warmup_steps=warmup)
