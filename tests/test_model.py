"""Tests for worldmodel.encoders and worldmodel.model (WorldModel)."""

import math

import pytest
import torch

from worldmodel.encoders import ConvEncoder, MLPEncoder, SequenceEncoder, normalize_frames
from worldmodel.kalman import Gaussian
from worldmodel.model import ModelConfig, WorldModel, shift_actions
from worldmodel.objective import LatentNorm, multistep_log_likelihood

DTYPES = [torch.float32, torch.float64]
SMALL = dict(image_size=16, pool=1, depth=4, latent_dim=3, action_dim=1, multistep_horizon=0)


def _model(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = WorldModel.from_config(ModelConfig(**{**SMALL, **kw})).to(dtype)
    # a few training-mode passes so the running latent statistics are not the identity
    frames, _ = _data(seed=seed + 100)
    with torch.no_grad():
        for _ in range(3):
            model.encode(frames)
    return model.eval()


def _data(batch=2, steps=10, size=16, seed=0, action_dim=1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, steps, size, size, 3), generator=g, dtype=torch.uint8)
    actions = torch.randn(batch, steps, action_dim, generator=g)
    return frames, actions


# ---- encoders --------------------------------------------------------------------------------
def test_uint8_frames_are_scaled_to_unit_interval_around_zero():
    frames = torch.tensor([0, 255, 51], dtype=torch.uint8)
    assert torch.allclose(normalize_frames(frames), torch.tensor([-0.5, 0.5, 0.2 - 0.5]))
    for size, pool in ((16, 1), (64, 2), (64, 4)):  # pooled encoders pool the uint8 frames before scaling them
        enc = ConvEncoder(size, 3, 5, depth=4, pool=pool)
        x = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8)
        assert torch.allclose(enc(x), enc(x.float() / 255 - 0.5), atol=1e-6)
        assert torch.allclose(enc.double()(x), enc(x.double() / 255 - 0.5), atol=1e-12)


@pytest.mark.parametrize("size,pool", [(16, 1), (32, 1), (64, 2), (48, 1)])
def test_conv_encoder_sizes(size, pool):
    enc = ConvEncoder(size, 3, 7, depth=2, pool=pool)
    assert enc(torch.zeros(2, size, size, 3, dtype=torch.uint8)).shape == (2, 7)


def test_conv_encoder_rejects_frames_of_another_size_or_dtype():
    enc = ConvEncoder(16, 3, 4, depth=2)
    with pytest.raises(ValueError, match="image_size=16"):
        enc(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        enc(torch.zeros(1, 16, 16, 3, dtype=torch.int64))


def test_sequence_encoder_folds_batch_and_time_and_marks_nan_frames():
    torch.manual_seed(0)
    item = MLPEncoder(5, 3, hidden=8)
    seq = SequenceEncoder(item, chunk_size=4)
    x = torch.randn(2, 7, 5)
    out = seq(x)
    ref = torch.stack([torch.stack([item(x[b, t:t + 1])[0] for t in range(7)]) for b in range(2)])
    assert torch.allclose(out, ref, atol=1e-6)
    x[1, 3, 0] = float("nan")
    out = seq(x)
    assert torch.isnan(out[1, 3]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 4]).all()
    with pytest.raises(ValueError, match="in_dim|shape"):
        item(torch.randn(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["batch", "whiten"])
def test_latent_norm_standardises_by_batch_statistics_in_training(dtype, kind):
    g = torch.Generator().manual_seed(1)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.3, -1.0, 3.0]], dtype=dtype)
    z = (torch.randn(64, 20, 3, generator=g, dtype=dtype) @ mix + 5.0).requires_grad_(True)
    norm = LatentNorm(3, kind, momentum=1.0, eps=0.0).to(dtype)
    out = norm(z)
    flat = out.detach().reshape(-1, 3)
    cov = torch.cov(flat.T)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(flat.mean(0), torch.zeros(3, dtype=dtype), atol=tol)
    if kind == "batch":
        corr = torch.corrcoef(z.detach().reshape(-1, 3).T)
        assert torch.allclose(cov, corr, atol=tol)  # standardised, correlations kept
    else:
        assert torch.allclose(cov, torch.eye(3, dtype=dtype), atol=tol)
    # the gradient flows through the batch statistics: sum over the batch of normalised values is
    # constant (0), so its gradient vanishes; with the (fixed) running statistics of eval it does not
    out.sum().backward()
    assert z.grad.abs().max() < 1e-3 if dtype == torch.float32 else z.grad.abs().max() < 1e-9
    norm.eval()
    z.grad = None
    evaluated = norm(z)
    # eval uses the running (population, 1/N) moments: momentum 1 -> the last batch's, up to (N-1)/N
    n = z.shape[0] * z.shape[1]
    assert torch.allclose(evaluated.detach(), out.detach() * math.sqrt(n / (n - 1)), atol=tol * 10)
    evaluated.sum().backward()
    assert z.grad.abs().max() > 0.1
    z_nan = z.detach().clone()
    z_nan[0, 0] = float("nan")
    assert torch.isnan(norm(z_nan)[0, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_norm_running_statistics_are_bias_corrected_population_moments(dtype):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 5, 2, generator=g, dtype=dtype) + shift for shift in (3.0, -1.0, 0.5)]
    norm = LatentNorm(2, "whiten", momentum=0.5).to(dtype)
    for b in batches:
        norm(b)
    weights = torch.tensor([0.25, 0.5, 1.0], dtype=dtype)
    weights = weights / weights.sum()  # bias-corrected EMA weights of the three batches
    flat = [b.reshape(-1, 2) for b in batches]
    mean = sum(w * f.mean(0) for w, f in zip(weights, flat))
    cov = sum(w * f.T @ f / len(f) for w, f in zip(weights, flat)) - torch.outer(mean, mean)
    got_mean, got_cov = norm.statistics()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got_mean, mean, atol=tol) and torch.allclose(got_cov, cov, atol=tol)


# ---- WorldModel: filtering ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_online_step_equals_batch_filter(dtype):
    model = _model(dtype)
    frames, actions = _data()
    actions = actions.to(dtype)
    with torch.no_grad():
        result = model.filter(frames, actions)
        belief = model.init_belief(2)
        for t in range(frames.shape[1]):
            belief = model.step(belief, frames[:, t], None if t == 0 else actions[:, t - 1])
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
            assert torch.allclose(belief.mean, result.filtered.mean[:, t], **tol)
            assert torch.allclose(belief.cov, result.filtered.cov[:, t], **tol)


def test_action_shift_convention():
    actions = torch.arange(6.0).reshape(1, 3, 2)
    assert torch.equal(shift_actions(actions), torch.tensor([[[0.0, 0.0], [0.0, 1.0], [2.0, 3.0]]]))
    # the filter's predicted mean at t moves with action[t-1] through G: change the last action only,
    # nothing in the filter changes; change action[0] and the prediction for t=1 changes
    model = _model(torch.float64)
    with torch.no_grad():
        model.prior.G.fill_(1.0)
        frames, acts = _data()
        acts = acts.double()
        base = model.filter(frames, acts).predicted.mean
        late = acts.clone()
        late[:, -1] += 5.0
        assert torch.equal(model.filter(frames, late).predicted.mean, base)
        early = acts.clone()
        early[:, 0] += 5.0
        changed = model.filter(frames, early).predicted.mean
        assert torch.equal(changed[:, 0], base[:, 0]) and not torch.allclose(changed[:, 1], base[:, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropped_frames_widen_covariance_and_never_crash(dtype):
    model = _model(dtype)
    frames, actions = _data(steps=12)
    actions = actions.to(dtype)
    dropped = frames.to(dtype).div(255).sub(0.5)
    dropped[:, 5:8] = float("nan")
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 5:8] = False
    with torch.no_grad():
        full = model.filter(frames, actions)
        by_nan = model.filter(dropped, actions)
        by_mask = model.filter(frames, actions, mask=mask)
        for res in (by_nan, by_mask):
            for t in range(5, 8):
                diff = res.filtered.cov[:, t] - full.filtered.cov[:, t]
                assert torch.linalg.eigvalsh(diff).min() > -1e-5  # P_dropped >= P_observed (Loewner)
                assert (diff.diagonal(dim1=-2, dim2=-1).sum(-1) > 0).all()
            # the covariance grows while predicting only
            traces = res.filtered.cov[:, 4:8].diagonal(dim1=-2, dim2=-1).sum(-1)
            assert (traces[:, 1:] > traces[:, :-1]).all()
        assert torch.allclose(by_nan.filtered.mean, by_mask.filtered.mean, atol=1e-5)
        # online: frame None and a NaN frame both only predict
        belief = model.init_belief(2)
        a = model.step(belief, None, actions[:, 0])
        b = model.step(belief, dropped[:, 5], actions[:, 0])
        assert torch.allclose(a.mean, b.mean) and torch.allclose(a.cov, b.cov)
    model.train()  # online filtering of one frame also works in training mode (running statistics)
    with torch.no_grad():
        c = model.step(model.init_belief(1), frames[:1, 0])
    assert torch.allclose(c.mean, full.filtered.mean[:1, 0], atol=1e-5)
    out = model.loss(dropped, actions)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    out = model.loss(frames, actions, mask=mask)
    assert math.isfinite(float(out.loss.detach()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_imagine_matches_dense_k_step_formula(dtype):
    model = _model(dtype)
    lm = model.prior
    frames, actions = _data()
    actions = actions.to(dtype)
    with torch.no_grad():
        lm.G.copy_(torch.randn(lm.state_dim, 1, dtype=dtype))
        lm.b.copy_(torch.randn(lm.state_dim, dtype=dtype))
        belief = Gaussian(*(x[:, 4] for x in model.filter(frames, actions).filtered))
        future = actions[:, 4:9]
        states = model.imagine(belief, future)
        latents = model.imagine(belief, future, observe=True)
        A, Q, G, b, C, R = lm.A, lm.Q, lm.G, lm.b, lm.C, lm.R
        m, P = belief.mean.double(), belief.cov.double()
        for k in range(5):
            m = m @ A.double().T + (b.double() - A.double() @ b.double()) + future[:, k].double() @ G.double().T
            P = A.double() @ P @ A.double().T + Q.double()
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
            assert torch.allclose(states.mean[:, k].double(), m, **tol)
            assert torch.allclose(states.cov[:, k].double(), P, **tol)
            assert torch.allclose(latents.mean[:, k].double(), m @ C.double().T, **tol)
            assert torch.allclose(latents.cov[:, k].double(), C.double() @ P @ C.double().T + R.double(), **tol)
    assert model.imagine(model.init_belief(2), torch.zeros(2, 3, 1, dtype=dtype)).mean.shape == (2, 3, 6)


# ---- WorldModel: training, methods, checkpoints ------------------------------------------------
def test_loss_trains_and_param_groups_use_kalman_multiplier():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(**SMALL, prior_lr_multiplier=50.0))
    groups = model.param_groups(1e-3)
    kalman_ids = {id(p) for p in model.prior.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 5e-2]
    assert {id(p) for p in groups[1]["params"]} == kalman_ids
    assert not kalman_ids & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.prior.lr_multiplier == 50.0
    frames, actions = _data(batch=4, steps=8)
    out = model.loss(frames, actions)
    out.loss.backward()
    assert out.loss.dim() == 0 and {"loss", "alignment", "entropy"} <= set(out.logs)
    assert model.encoder.encoder.head.weight.grad.abs().sum() > 0


def test_non_kalman_method_trains_but_cannot_filter():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(**SMALL, method="vicreg"))
    frames, actions = _data(batch=8, steps=2)
    out = model.loss(frames, actions)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert model.features(frames).shape == (8, 2, 3)
    assert not model.can_filter
    with pytest.raises(TypeError, match="state-space prior"):
        model.filter(frames, actions)
    with pytest.raises(TypeError, match="state-space prior"):
        model.init_belief(1)


def test_ema_target_encoder_is_used_and_updated():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(**SMALL, method_kwargs={"target_ema": 0.5}))
    assert model.target_encoder is not None
    frames, actions = _data(batch=4, steps=6)
    base = float(model.loss(frames, actions).loss.detach())
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.3)
    assert float(model.loss(frames, actions).loss.detach()) != pytest.approx(base)
    online = next(model.encoder.parameters())
    target = next(model.target_encoder.parameters())
    expected = 0.5 * target.detach() + 0.5 * online.detach()
    model.update_target()
    assert torch.allclose(target, expected)


def test_heteroscedastic_noise_is_per_frame():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(**SMALL, heteroscedastic=True)).eval()
    frames, actions = _data()
    z, var = model._latents(frames)
    assert var.shape == z.shape and (var > 0).all()
    res = model.filter(frames, actions)
    belief = model.init_belief(2)
    for t in range(3):
        belief = model.step(belief, frames[:, t], None if t == 0 else actions[:, t - 1])
    assert torch.allclose(belief.mean, res.filtered.mean[:, 2], atol=1e-5)
    model.train()
    assert math.isfinite(float(model.loss(frames, actions).loss.detach()))


def test_mlp_encoder_world_model():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(encoder="mlp", input_dim=5, latent_dim=2, action_dim=0, hidden=16))
    x = torch.randn(3, 7, 5)
    assert math.isfinite(float(model.loss(x).loss.detach()))
    assert model.eval().filter(x).filtered.mean.shape == (3, 7, 4)


def test_wrong_image_size_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="image_size=16"):
        model.encode(torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size=16"):
        model.step(model.init_belief(1), torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="actions"):
        model.filter(torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="method"):
        ModelConfig(method="nope")


def test_save_load_round_trip_and_config_mismatch(tmp_path):
    model = _model()
    frames, actions = _data()
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = WorldModel.load(path).eval()
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        assert torch.equal(loaded.filter(frames, actions).filtered.mean, model.filter(frames, actions).filtered.mean)
    assert WorldModel.load(path, config=model.config).config == model.config
    with pytest.raises(ValueError, match="latent_dim"):
        WorldModel.load(path, config=ModelConfig(**{**SMALL, "latent_dim": 4}))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ldm-worldmodel checkpoint"):
        WorldModel.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        WorldModel.load(tmp_path / "missing.pt")
    # weights of another architecture under a config: clear error
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["depth"] = 8
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="does not match its config"):
        WorldModel.load(tmp_path / "tampered.pt")
    # a checkpoint of the layout before the prior interface (latent norm outside the objective) still loads
    old = {k.replace("objective.latent_norm.", "latent_norm.").replace("objective.prior.", "objective.latent_model."): v
           for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    torch.save({**torch.load(path, weights_only=True), "state_dict": old}, tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(WorldModel.load(tmp_path / "old.pt").state_dict().values(),
                                                 model.state_dict().values()))


def test_multistep_term_matches_k_step_predictive_nll():
    """The k-step training term equals the count-weighted mean of evaluation.predictive_metrics' NLLs."""
    from worldmodel.evaluation import predictive_metrics

    model = _model(torch.float64, multistep_horizon=4)
    frames, actions = _data(steps=9)
    actions = actions.double()
    with torch.no_grad():
        z = model.encode(frames)
        term = multistep_log_likelihood(model.prior, z, z, 4, shift_actions(actions))
        nll = predictive_metrics(model.prior, z, actions, horizon=4, burn_in=0)["nll"]
    counts = [9 - k for k in (2, 3, 4)]
    ref = sum(c * n for c, n in zip(counts, nll[1:])) / sum(counts)
    assert float(-term) == pytest.approx(ref, rel=1e-9)
    model.train()
    out = model.loss(frames, actions.float().double())
    assert "multistep" in out.logs and math.isfinite(out.logs["loss"])
    with pytest.raises(ValueError, match="multistep_horizon"):
        ModelConfig(**{**SMALL, "multistep_horizon": 1})
    with pytest.raises(ValueError, match="state-space prior"):  # pair priors cannot predict k steps
        WorldModel.from_config(ModelConfig(**{**SMALL, "method": "vicreg", "multistep_horizon": 3}))
    vicreg = WorldModel.from_config(ModelConfig(**{**SMALL, "method": "vicreg", "multistep_horizon": None}))
    assert "multistep" not in vicreg.loss(frames, actions.float()).logs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kstep_predictive_rolls_shared_covariances_out_once(dtype):
    """A fully observed batch shares one filtered covariance per step: the k-step predictive rolls it out
    once, (1, N, H, L, L), and its means, covariances and gradients equal predict-only `step`s of each
    sequence and the per-sequence rollout of the same beliefs."""
    from worldmodel.objective import kstep_predictive
    from worldmodel.priors.linear_gaussian import KalmanLatentModel

    torch.manual_seed(0)
    prior = KalmanLatentModel(obs_dim=3, state_dim=5, action_dim=2, learn_C=True).to(dtype)
    z, u = torch.randn(4, 10, 3, dtype=dtype, requires_grad=True), torch.randn(4, 10, 2, dtype=dtype)
    filtered = prior.filter(z, u).filtered
    starts, horizon = torch.tensor([0, 3, 7]), 4
    shared, times, valid = kstep_predictive(prior, filtered, u, starts, horizon)
    per_sequence = kstep_predictive(prior, Gaussian(filtered.mean, filtered.cov.contiguous()), u, starts, horizon)[0]
    assert shared.cov.shape == (1, 3, horizon, 3, 3) and per_sequence.cov.shape == (4, 3, horizon, 3, 3)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for j, t in enumerate(starts.tolist()):
        belief = Gaussian(filtered.mean[:, t], filtered.cov[:, t])
        for k in range(horizon):
            belief = prior.step(belief, None, u[:, times[j, k]])
            reference = prior.predict_observation(belief)
            torch.testing.assert_close(shared.mean[:, j, k], reference.mean, **tol)
            torch.testing.assert_close(shared.cov[0, j, k].expand(4, 3, 3), reference.cov, **tol)
    target = torch.randn(4, 3, horizon, 3, dtype=dtype)
    params = [z, *prior.parameters()]
    grads = [torch.autograd.grad(pred.log_prob(target).sum(), params, allow_unused=True, retain_graph=True)
             for pred in (shared, per_sequence)]
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


# ---- WorldModel.surprise -------------------------------------------------------------------------
@pytest.mark.parametrize("heteroscedastic", [False, True])
def test_surprise_summed_online_equals_minus_filter_log_likelihood(heteroscedastic):
    model = _model(torch.float64, heteroscedastic=heteroscedastic)
    frames, actions = _data(steps=12)
    actions = actions.double()
    frames = frames.double()
    frames[1, 4] = float("nan")  # a dropped frame: NaN surprise, nothing in the log-likelihood
    with torch.no_grad():
        result = model.filter(frames, actions)
        belief, scores = model.init_belief(2), []
        for t in range(frames.shape[1]):
            action = None if t == 0 else actions[:, t - 1]
            scores.append(model.surprise(belief, frames[:, t], action))
            belief = model.step(belief, frames[:, t], action)
    scores = torch.stack(scores, 1)
    assert scores.shape == (2, 12) and scores.dtype == torch.float64
    assert torch.isnan(scores[1, 4]) and torch.isfinite(scores[0]).all() and int(torch.isnan(scores).sum()) == 1
    assert torch.allclose(scores.nansum(1), -result.log_likelihood, rtol=1e-10, atol=1e-9)
    assert torch.allclose(scores.nan_to_num(0.0), -result.step_log_likelihood, rtol=1e-10, atol=1e-9)


def test_surprise_errors_and_float32():
    model = _model()
    frames, actions = _data()
    belief = model.init_belief(2)
    s = model.surprise(belief, frames[:, 0], actions[:, 0])
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="dropped frame has no surprise"):
        model.surprise(belief, None)
    with pytest.raises(ValueError, match="action must have shape"):
        model.surprise(belief, frames[:, 0], actions[:, 0, 0])
    with pytest.raises(ValueError, match="image_size=16"):
        model.surprise(belief, torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    torch.manual_seed(0)
    vicreg = WorldModel.from_config(ModelConfig(**SMALL, method="vicreg"))
    with pytest.raises(TypeError, match="surprise needs a state-space prior"):
        vicreg.surprise(belief, frames[:, 0])
