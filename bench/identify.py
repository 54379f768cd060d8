"""Synthetic identifiability suite: linear latent systems behind a random invertible MLP, recovered by WorldModel.

    python bench/identify.py --quick                       # CPU: 2, 3 and 4 latents, kalman, a few minutes
    python bench/identify.py                               # 2..8 latents, 1500 steps each
    python bench/identify.py --latents 3 --presets kalman kalman_knn --seeds 0 1 2 \
        --model '{"latent_norm": "batch"}' --label batch-norm --out bench/results/identify.jsonl

The data (DESIGN section 5, "synthetic mixed linear systems"):

- Sources s_t in R^n, n = 2..8: a block-diagonal linear system s_t = A s_{t-1} + w_t with mixed time scales
  (`latent_system`): round(n / 3) (at least one) damped 2-D rotations, r e^{+-i omega} with omega spaced
  geometrically from 0.1 to 0.8 rad/step and r from 0.98 to 0.9 (time constants 50 down to 10 steps), and the rest
  real decays lambda from 0.7 up to 0.95 (time constants 3 to 20 steps; a single decay is the fast 0.7, so that
  already 3 sources mix a slow rotation with a fast decay). The driving noise w_t ~ N(0, diag(1 - |eig|^2)) keeps
  every source at unit stationary variance, and s_0 is drawn from that stationary law.
- Observations x_t = M(s_t) in R^40 (`random_mixing`): `layers` leaky-ReLU layers (slope 0.2) with square weights
  U diag(sigma) V^T (U, V random orthogonal, sigma uniform in [0.5, 2]: invertible, condition number <= 4) and random
  biases, then a random linear map R^n -> R^40 (full column rank). M is invertible on its image
  (`MLPMixing.inverse`).

For every preset and number of sources a `WorldModel` with an MLP encoder (ModelConfig(encoder="mlp"), latent
dimension L = 2n by default, `--latent-ratio`; see "Why L = 2n" below) trains with train.py's optimizer and
schedule (`make_optimizer`, `lr_factor`: AdamW, warm-up, cosine decay, gradient clipping) on random windows of the
training sequences. Scores on held-out
sequences, after a burn-in: R^2 per source of an affine readout fit on the training sequences
(`worldmodel.evaluation.linear_r2`) from `WorldModel.features` (the filtered state means of a state-space prior,
else the latents) and, for the diagnosis, from the encoder latents z; and the MCC of the features against the
sources (`worldmodel.evaluation.mcc`). Each run appends one JSON line to `--out` and prints a row.

Why L = 2n (measured on 3 sources, kalman, 1500 steps, seeds 0 / 1; R^2 per source: slow rotation x2, fast decay):
with as many latents as sources (L = n) the fast decay is dropped, R^2 0.00 / 0.01 (rotation 0.96), and no other
knob changes that: batch standardisation instead of whitening (-0.00 / 0.01), S = L (-0.00 / 0.54), no k-step term
(0.01 / 0.00), prior learning rate x10 or x1 instead of x100 (0.00, 0.02; seed 0). The encoder's third latent is
then a quadratic function of the rotation (R^2 0.80 from degree-2 features of the two rotation sources, 0.00 from
the decay), and the learned A has a real eigenvalue 0.94, near the r^2 = 0.96 at which the rotation's energy
s1^2 + s2^2 decays: a slow feature, linearly uncorrelated with s1, s2 (whitening does not object) and far more
predictable than the decay with lambda = 0.7, and predictability is all the stop-gradient objective asks of a latent.
With L = 2n there is room for both: 0.96, 0.96, 0.89 / 0.97, 0.97, 0.86.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from worldmodel.evaluation import linear_r2, mcc
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.training import TrainConfig, build_model, lr_factor, make_optimizer

SLOPE = 0.2  # leaky-ReLU negative slope of the mixing


# ---------------------------------------------------------------------------------------- the latent system
def latent_system(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """The n-source system of the module docstring: transition A (n, n), driving-noise std (n,) and the requested
    eigenvalues (n,) complex (each rotation as its conjugate pair)."""
    if n < 2:
        raise ValueError(f"need at least 2 sources, got {n}")
    rotations = max(1, round(n / 3))
    decays = n - 2 * rotations

    def spaced(a: float, b: float, k: int) -> list[float]:
        return [a] if k == 1 else [a * (b / a) ** (i / (k - 1)) for i in range(k)]

    def linear(a: float, b: float, k: int) -> list[float]:
        return [a] if k == 1 else [a + (b - a) * i / (k - 1) for i in range(k)]

    blocks, eigenvalues = [], []
    for omega, r in zip(spaced(0.1, 0.8, rotations), linear(0.98, 0.9, rotations)):
        c, s = r * math.cos(omega), r * math.sin(omega)
        blocks.append(torch.tensor([[c, -s], [s, c]], dtype=dtype))
        eigenvalues += [complex(c, s), complex(c, -s)]
    for lam in linear(0.7, 0.95, decays) if decays else []:
        blocks.append(torch.tensor([[lam]], dtype=dtype))
        eigenvalues.append(complex(lam, 0.0))
    eigenvalues = torch.tensor(eigenvalues, dtype=torch.complex128)
    noise_std = (1 - eigenvalues.abs() ** 2).sqrt().to(dtype)
    return torch.block_diag(*blocks), noise_std, eigenvalues


def simulate(A: Tensor, noise_std: Tensor, batch: int, steps: int, gen: torch.Generator) -> Tensor:
    """Stationary sequences s (B, T, n) of s_t = A s_{t-1} + noise_std * N(0, I), s_0 ~ N(0, I)."""
    s = [torch.randn(batch, len(A), generator=gen, dtype=A.dtype)]
    for _ in range(steps - 1):
        s.append(s[-1] @ A.T + noise_std * torch.randn(batch, len(A), generator=gen, dtype=A.dtype))
    return torch.stack(s, 1)


# ---------------------------------------------------------------------------------------- the mixing
@dataclass
class MLPMixing:
    """x = readout(leaky(W_k ... leaky(W_1 s + b_1) ... + b_k)): square invertible W_i (n, n), biases (n,),
    readout (D, n) of full column rank."""

    weights: list[Tensor]
    biases: list[Tensor]
    readout: Tensor

    def __call__(self, s: Tensor) -> Tensor:
        """Sources (..., n) -> observations (..., D)."""
        h = s
        for w, b in zip(self.weights, self.biases):
            h = F.leaky_relu(h @ w.T + b, SLOPE)
        return h @ self.readout.T

    def inverse(self, x: Tensor) -> Tensor:
        """Observations (..., D) on the image of the mixing -> the sources (..., n) (least squares through the readout,
        then each layer undone)."""
        h = torch.linalg.lstsq(self.readout, x.reshape(-1, x.shape[-1]).T).solution.T.reshape(*x.shape[:-1], -1)
        for w, b in zip(reversed(self.weights), reversed(self.biases)):
            h = torch.where(h >= 0, h, h / SLOPE)
            h = torch.linalg.solve(w, (h - b).unsqueeze(-1)).squeeze(-1)
        return h


def random_mixing(n: int, obs_dim: int, layers: int, gen: torch.Generator,
                  dtype: torch.dtype = torch.float64) -> MLPMixing:
    """The random invertible MLP of the module docstring."""
    if obs_dim < n:
        raise ValueError(f"obs_dim ({obs_dim}) must be >= the number of sources ({n}) for an invertible mixing")

    def orthogonal() -> Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
        return q * torch.sign(torch.diagonal(r))

    weights = [orthogonal() @ torch.diag(0.5 + 1.5 * torch.rand(n, generator=gen, dtype=dtype)) @ orthogonal().T
               for _ in range(layers)]
    biases = [0.5 * torch.randn(n, generator=gen, dtype=dtype) for _ in range(layers)]
    readout = torch.randn(obs_dim, n, generator=gen, dtype=dtype) / math.sqrt(n)
    return MLPMixing(weights, biases, readout)


def make_task(n: int, seed: int, obs_dim: int = 40, layers: int = 3, train_seqs: int = 256, test_seqs: int = 64,
              length: int = 64) -> dict[str, Tensor]:
    """Sources and float32 observations of training and held-out sequences: s_train (N, T, n), x_train (N, T, D),
    s_test, x_test. The seed fixes the mixing and the noise."""
    gen = torch.Generator().manual_seed(seed)
    A, noise_std, _ = latent_system(n)
    mixing = random_mixing(n, obs_dim, layers, gen)
    task = {}
    for split, count in (("train", train_seqs), ("test", test_seqs)):
        s = simulate(A, noise_std, count, length, gen)
        task[f"s_{split}"], task[f"x_{split}"] = s, mixing(s).float()
    return task


# ---------------------------------------------------------------------------------------- training and scores
def train_model(task: dict[str, Tensor], model_cfg: ModelConfig, cfg: TrainConfig) -> WorldModel:
    """`cfg.steps` steps of train.py's optimizer and schedule on random windows of the training sequences."""
    model = build_model(dataclasses.replace(cfg, model=model_cfg), torch.device("cpu"))
    optimizer = make_optimizer(model, cfg)
    x = task["x_train"]
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        seq = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        start = torch.randint(x.shape[1] - cfg.window + 1, (cfg.batch_size, 1), generator=gen)
        batch = x[seq[:, None], start + torch.arange(cfg.window)]
        model.train()
        loss = model.loss(batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.update_target()
    return model.eval()


@torch.no_grad()
def score(model: WorldModel, task: dict[str, Tensor], burn_in: int = 5) -> dict:
    """Held-out R^2 per source from the features (filtered means or latents) and from the encoder latents z, and
    the features' MCC."""
    out = {}
    for name, fn in (("r2", model.features), ("r2_z", model.encode)):
        f_train, f_test = (fn(task[f"x_{split}"])[:, burn_in:] for split in ("train", "test"))
        out[name] = linear_r2(f_train, task["s_train"][:, burn_in:], f_test, task["s_test"][:, burn_in:]).tolist()
        if name == "r2":
            out["mcc"] = mcc(f_test, task["s_test"][:, burn_in:])
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2, 3, 4 sources, 800 steps (CPU, a few minutes)")
    parser.add_argument("--latents", type=int, nargs="+", help="numbers of sources (default 2..8; quick: 2 3 4)")
    parser.add_argument("--presets", nargs="+", default=["kalman"], help="methods of worldmodel.methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the mixing, data and model")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 1500; quick: 800)")
    parser.add_argument("--latent-ratio", type=int, default=2,
                        help="encoder latent dimension L = ratio x the number of sources (1: as many as sources)")
    parser.add_argument("--model", type=json.loads, default={}, help="JSON overrides of ModelConfig")
    parser.add_argument("--train", type=json.loads, default={}, help="JSON overrides of TrainConfig (lr, ...)")
    parser.add_argument("--obs-dim", type=int, default=40)
    parser.add_argument("--mixing-layers", type=int, default=3)
    parser.add_argument("--label", default="", help="name of this configuration in the output")
    parser.add_argument("--out", type=Path, help="append one JSON line per run to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    latents = args.latents or ([2, 3, 4] if args.quick else list(range(2, 9)))
    steps = args.steps or (800 if args.quick else 1500)

    results = []
    print(f"{'label':<12} {'preset':<14} {'n':>2} {'seed':>4} {'min R2':>7} {'MCC':>6}  R2 per source (features | z)")
    for n in latents:
        for seed in args.seeds:
            task = make_task(n, seed, args.obs_dim, args.mixing_layers)
            for preset in args.presets:
                model_cfg = ModelConfig(**{"encoder": "mlp", "input_dim": args.obs_dim, "action_dim": 0,
                                           "latent_dim": args.latent_ratio * n, "method": preset, **args.model})
                cfg = TrainConfig(**{"steps": steps, "seed": seed, "device": "cpu", **args.train})
                t0 = time.time()
                record = {"label": args.label, "preset": preset, "latents": n, "latent_dim": model_cfg.latent_dim,
                          "seed": seed, "steps": steps,
                          "model": args.model, "train": args.train,
                          **score(train_model(task, model_cfg, cfg), task), "seconds": round(time.time() - t0, 1)}
                results.append(record)
                r2 = " ".join(f"{v:6.3f}" for v in record["r2"])
                r2_z = " ".join(f"{v:6.3f}" for v in record["r2_z"])
                print(f"{args.label:<12} {preset:<14} {n:>2} {seed:>4} {min(record['r2']):7.3f} {record['mcc']:6.3f}  "
                      f"{r2} | {r2_z}", flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
    return results


if __name__ == "__main__":
    main()
