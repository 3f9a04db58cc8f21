"""Promises of the ablation axes (models/axes.py): samplers, time embedding / conditioning registries,
loss weighting, caption dropout."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffablate.models import axes
from diffablate.models.config import ConfigError, RunConfig

REGISTRIES = {
    "timestep_sampler": axes.TIMESTEP_SAMPLERS,
    "time_embedding": axes.TIME_EMBEDDINGS,
    "conditioning": axes.CONDITIONINGS,
    "loss_weighting": axes.LOSS_WEIGHTINGS,
}


def cfg(**over) -> RunConfig:
    return RunConfig().with_overrides(over)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sampler(name: str, **over) -> axes.TimestepSampler:
    return axes.TIMESTEP_SAMPLERS.get(name)(cfg(**over))


# --- registries ----------------------------------------------------------------------------------


def test_registries_hold_the_documented_names():
    assert list(axes.TIMESTEP_SAMPLERS) == ["uniform", "sequential", "reverse-sequential", "cyclic", "stratified",
                                            "loss-aware", "logit-normal", "curriculum"]
    assert list(axes.TIME_EMBEDDINGS) == ["on", "off"]
    assert list(axes.CONDITIONINGS) == ["none", "cross-attention", "cross-attention-pooled", "pooled", "concat"]
    assert list(axes.LOSS_WEIGHTINGS) == ["none", "min-snr"]


@pytest.mark.parametrize("field,registry", REGISTRIES.items())
def test_unknown_name_raises_keyerror_listing_choices(field, registry):
    with pytest.raises(KeyError) as e:
        registry.get("bogus")
    for name in registry:
        assert name in str(e.value)
    with pytest.raises(ConfigError, match=f"axes.{field}"):
        cfg(**{f"axes.{field}": "bogus"})


# --- every sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(axes.TIMESTEP_SAMPLERS))
def test_sampler_outputs_valid_timesteps_and_positive_weights(name):
    s = sampler(name, **{"train.steps": 20, "diffusion.num_train_timesteps": 100})
    g = gen()
    for step in range(20):
        t, w = s.sample(16, step, g, "cpu")
        assert t.dtype == torch.long and w.dtype == torch.float32
        assert t.shape == w.shape == (16,)
        assert 0 <= int(t.min()) and int(t.max()) < 100
        assert bool((w > 0).all())
        s.update(t, torch.rand(16, generator=g))


@pytest.mark.parametrize("name", list(axes.TIMESTEP_SAMPLERS))
def test_state_dict_round_trip_gives_identical_next_samples(name):
    # Loss-aware with a tiny T and history so it is warmed up (its state matters) after a few steps.
    over = {"train.steps": 40, "diffusion.num_train_timesteps": 20, "axes.loss_aware_history": 2}
    a, g = sampler(name, **over), gen(1)
    for step in range(30):
        t, _ = a.sample(16, step, g, "cpu")
        a.update(t, (t.double() + 1) * torch.rand(16, generator=g, dtype=torch.float64))
    state, g_state = a.state_dict(), g.get_state()
    b, g2 = sampler(name, **over), torch.Generator()
    b.load_state_dict(state)
    g2.set_state(g_state)
    for step in range(30, 35):
        ta, wa = a.sample(16, step, g, "cpu")
        tb, wb = b.sample(16, step, g2, "cpu")
        assert torch.equal(ta, tb) and torch.equal(wa, wb)


def test_loss_aware_state_really_matters():
    # Guards the round-trip test above: a fresh (unwarmed) sampler would give different weights.
    over = {"diffusion.num_train_timesteps": 20, "axes.loss_aware_history": 2}
    a, g = sampler("loss-aware", **over), gen(0)
    for _ in range(10):
        t, _ = a.sample(16, 0, g, "cpu")
        a.update(t, t.double() + 1)
    assert a.warmed_up()
    _, w = a.sample(16, 0, gen(5), "cpu")
    _, w_fresh = sampler("loss-aware", **over).sample(16, 0, gen(5), "cpu")
    assert not torch.equal(w, w_fresh) and bool((w_fresh == 1).all())


# --- sequential / cyclic / stratified --------------------------------------------------------------


def test_sequential_is_monotone_and_covers_the_schedule_exactly_once():
    T, steps, B = 100, 25, 4  # steps * B == T: every t exactly once
    s, g = sampler("sequential", **{"train.steps": steps, "diffusion.num_train_timesteps": T}), gen()
    ts = torch.cat([s.sample(B, step, g, "cpu")[0] for step in range(steps)])
    assert torch.equal(ts, torch.arange(T))


def test_sequential_longer_run_is_monotone_and_covers_every_t():
    T, steps, B = 100, 60, 8
    s, g = sampler("sequential", **{"train.steps": steps, "diffusion.num_train_timesteps": T}), gen()
    ts = torch.cat([s.sample(B, step, g, "cpu")[0] for step in range(steps)])
    assert bool((ts[1:] >= ts[:-1]).all())
    assert set(ts.tolist()) == set(range(T))
    assert int(ts[0]) == 0 and int(ts[-1]) == T - 1
    # Past the end of the run it stays at the last timestep instead of wrapping around.
    assert set(s.sample(B, steps + 5, g, "cpu")[0].tolist()) == {T - 1}


def test_reverse_sequential_walks_the_schedule_downwards_exactly_once():
    T, steps, B = 100, 60, 8
    s, g = sampler("reverse-sequential", **{"train.steps": steps, "diffusion.num_train_timesteps": T}), gen()
    fwd = sampler("sequential", **{"train.steps": steps, "diffusion.num_train_timesteps": T})
    ts = torch.cat([s.sample(B, step, g, "cpu")[0] for step in range(steps)])
    assert bool((ts[1:] <= ts[:-1]).all())  # never increases
    assert set(ts.tolist()) == set(range(T))
    assert int(ts[0]) == T - 1 and int(ts[-1]) == 0
    # Exactly the mirror image of the forward sweep, example by example.
    mirrored = torch.cat([T - 1 - fwd.sample(B, step, g, "cpu")[0] for step in range(steps)])
    assert torch.equal(ts, mirrored)


def test_samplers_that_follow_the_run_length_say_so():
    # Learning curves read budgets off one long run: only these samplers make that invalid.
    assert {n for n in axes.TIMESTEP_SAMPLERS if axes.TIMESTEP_SAMPLERS.get(n).follows_run_length} == {
        "sequential", "reverse-sequential", "curriculum"}


def test_cyclic_shares_t_in_the_batch_and_cycles_through_the_schedule():
    T = 100
    s, g = sampler("cyclic", **{"diffusion.num_train_timesteps": T}), gen()
    per_step = []
    for step in range(2 * T):
        t, _ = s.sample(8, step, g, "cpu")
        assert len(set(t.tolist())) == 1  # the whole batch shares one t
        per_step.append(int(t[0]))
    P = s.period
    assert P == math.ceil(T / axes.CYCLIC_STRIDE)
    first = per_step[:T]
    assert sorted(first) == list(range(T))  # T consecutive steps visit every t once
    assert per_step[T:] == first  # and then repeat
    for c in range(T // P):  # each sweep goes up through the schedule, the next one starts low again
        sweep = first[c * P:(c + 1) * P]
        assert sweep == sorted(sweep) and sweep[-1] - sweep[0] >= T - 2 * axes.CYCLIC_STRIDE
        if c:
            assert sweep[0] < first[c * P - 1]


def test_stratified_takes_one_draw_per_stratum():
    T, B = 1000, 8
    s, g = sampler("stratified", **{"diffusion.num_train_timesteps": T}), gen()
    seen_positions = set()
    for step in range(50):
        t, w = s.sample(B, step, g, "cpu")
        ts = sorted(t.tolist())
        for i, ti in enumerate(ts):
            assert i * T // B <= ti < (i + 1) * T // B
        seen_positions.add(int(t.argmin()))
        assert bool((w == 1).all())
    assert len(seen_positions) > 1  # strata are shuffled over the batch positions


# --- loss-aware: unbiased importance sampling ------------------------------------------------------


def _warm_loss_aware(T: int, history: int, f: torch.Tensor, g: torch.Generator) -> axes.LossAwareSampler:
    s = sampler("loss-aware", **{"diffusion.num_train_timesteps": T, "axes.loss_aware_history": history})
    for _ in range(history):  # noisy observed losses so p is not exactly proportional to f
        t = torch.arange(T)
        s.update(t, f * (0.5 + torch.rand(T, generator=g, dtype=torch.float64)))
    assert s.warmed_up()
    return s


def test_loss_aware_is_uniform_until_warmed_up():
    s, g = sampler("loss-aware", **{"diffusion.num_train_timesteps": 10, "axes.loss_aware_history": 3}), gen()
    s.update(torch.arange(9), torch.ones(9))  # t = 9 still has no loss
    s.update(torch.arange(10), torch.ones(10))
    s.update(torch.arange(10), torch.ones(10))
    assert not s.warmed_up()
    assert torch.allclose(s.probabilities(0), torch.full((10,), 0.1, dtype=torch.float64))
    _, w = s.sample(64, 0, g, "cpu")
    assert bool((w == 1).all())


def test_loss_aware_weighted_estimate_is_unbiased():
    T, n, g = 50, 40_000, gen(3)
    f = torch.exp(-torch.arange(T, dtype=torch.float64) / 8) + 0.05  # a skewed per-t loss
    s = _warm_loss_aware(T, 10, f, g)
    p = s.probabilities(0)
    assert p.min() > 0 and abs(float(p.sum()) - 1) < 1e-9
    assert p[0] > 5 * p[-1]  # it does importance-sample: high-loss timesteps are drawn more often
    t, w = s.sample(n, 0, g, "cpu")
    assert torch.allclose(w.double(), 1 / (T * p[t]), rtol=1e-6)
    est = w.double() * f[t]
    true = float(f.mean())
    se = float(est.std()) / math.sqrt(n)
    # 4 standard errors: a false failure has probability ~6e-5.
    assert abs(float(est.mean()) - true) < 4 * se
    # The weights are what make it unbiased: the unweighted mean is off by many standard errors.
    assert float(f[t].mean()) - true > 20 * se


def test_loss_aware_uniform_floor():
    T, g = 20, gen()
    f = torch.zeros(T, dtype=torch.float64)
    f[0] = 1.0  # every other t has zero loss: only the floor keeps it reachable
    s = _warm_loss_aware(T, 4, f, g)
    p = s.probabilities(0)
    u = s.uniform_prob
    assert torch.allclose(p[1:], torch.full((T - 1,), u / T, dtype=torch.float64))
    assert abs(float(p[0]) - (1 - u + u / T)) < 1e-12


# --- logit-normal / curriculum ---------------------------------------------------------------------


@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_logit_normal_distribution(mean):
    T, n = 1000, 20_000
    s = sampler("logit-normal", **{"axes.logit_normal_mean": mean, "axes.logit_normal_std": 1.0})
    t, w = s.sample(n, 0, gen(), "cpu")
    assert bool((w == 1).all())  # changes the training distribution: no importance weights
    u = (t.double() + 0.5) / T
    z = torch.log(u / (1 - u))  # back to the normal
    # mean / std of N(mean, 1) within ~5 standard errors (se = 1/sqrt(n) = 0.007); discretisation adds ~1e-3
    assert abs(float(z.mean()) - mean) < 0.04
    assert abs(float(z.std()) - 1.0) < 0.04
    # The middle half of the schedule gets P(|N(mean,1)| < logit(0.75)) of the draws, not 1/2.
    inner = ((t >= 250) & (t < 750)).double().mean()
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expect = phi(math.log(3) - mean) - phi(-math.log(3) - mean)
    assert abs(float(inner) - expect) < 0.02


def test_curriculum_unlocks_clusters_cumulatively_small_t_first():
    T, steps, K, n = 1000, 100, 4, 4000
    s = sampler("curriculum", **{"train.steps": steps, "axes.curriculum_stages": K})
    g = gen()
    for step, stage in [(0, 0), (24, 0), (25, 1), (60, 2), (99, 3)]:
        assert s.stage(step) == stage
        t, w = s.sample(n, step, g, "cpu")
        assert bool((w == 1).all())
        upper = (stage + 1) * T // K
        assert int(t.max()) < upper
        # uniform over all unlocked clusters (cumulative): each cluster gets ~1/(stage+1) of the draws
        counts = torch.bincount(t // (T // K), minlength=K).double() / n
        for k in range(stage + 1):
            assert abs(float(counts[k]) - 1 / (stage + 1)) < 0.04
        assert float(counts[stage + 1:].sum()) == 0


# --- time embedding axis ---------------------------------------------------------------------------


def test_time_embedding_off_feeds_constant_zero_and_on_feeds_t():
    t = torch.tensor([0, 5, 999])
    assert torch.equal(axes.TIME_EMBEDDINGS.get("on")(cfg()).unet_timesteps(t), t)
    assert torch.equal(axes.TIME_EMBEDDINGS.get("off")(cfg()).unet_timesteps(t), torch.zeros(3, dtype=torch.long))


# --- loss weighting ----------------------------------------------------------------------------------


def _snr_from_betas(T: int = 1000) -> torch.Tensor:
    # Independent of diffusers: DDPM's linear betas, alpha_bar = cumprod(1 - beta).
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    return ab / (1 - ab)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_formula(prediction_type):
    c = cfg(**{"axes.loss_weighting": "min-snr", "axes.min_snr_gamma": 5.0,
               "diffusion.prediction_type": prediction_type})
    weigh = axes.LOSS_WEIGHTINGS.get("min-snr")(c, DDPMScheduler(num_train_timesteps=1000))
    t = torch.tensor([0, 10, 50, 100, 300, 999])
    snr = _snr_from_betas()[t]
    expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    # rtol 1e-3: diffusers keeps alpha_bar in float32, and 1 - alpha_bar(0) = 1e-4 loses ~4 digits there.
    assert torch.allclose(weigh(t).double(), expected, rtol=1e-3)
    if prediction_type == "epsilon":
        assert bool((weigh(torch.tensor([300, 999])) == 1).all())  # SNR < gamma: weight 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_equals_min_snr_weighted_x0_loss(prediction_type):
    """The weighted loss in the network's target equals min(SNR, gamma) * |x0 - x0_hat|^2 (the paper's)."""
    c = cfg(**{"axes.min_snr_gamma": 5.0, "diffusion.prediction_type": prediction_type})
    sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    weigh = axes.LOSS_WEIGHTINGS.get("min-snr")(c, sch)
    g = gen()
    t = torch.tensor([3, 40, 200, 700])
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = sch.alphas_cumprod.double()[t][:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)  # some network output
    if prediction_type == "epsilon":
        target, x0_hat = eps, (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    else:
        target, x0_hat = ab.sqrt() * eps - (1 - ab).sqrt() * x0, ab.sqrt() * x_t - (1 - ab).sqrt() * pred
    lhs = weigh(t).double() * (pred - target).pow(2).mean((1, 2, 3))
    snr = (ab / (1 - ab)).flatten()
    rhs = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_no_weighting_is_ones():
    w = axes.LOSS_WEIGHTINGS.get("none")(cfg(), DDPMScheduler())(torch.tensor([0, 500, 999]))
    assert torch.equal(w, torch.ones(3))


# --- classifier-free guidance dropout ---------------------------------------------------------------


def test_drop_captions_rate_and_determinism():
    caps = [f"caption {i}" for i in range(4000)]
    a = axes.drop_captions(caps, 0.1, gen(7))
    assert a == axes.drop_captions(caps, 0.1, gen(7))
    dropped = sum(c == "" for c in a) / len(caps)
    assert abs(dropped - 0.1) < 0.02  # se = 0.0047
    assert all(c in ("", o) for c, o in zip(a, caps))
    assert axes.drop_captions(caps[:5], 0.0, gen()) == caps[:5]
