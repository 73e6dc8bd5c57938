"""What the frozen model's features are worth under DP: federated DP-SGD on the head alone.

For each `model.pooling`, the features the classifier reads are computed once with the
frozen MiniLM (a forward hook on the head), and a linear head is trained on them by the
same federation as `fedlora simulate` (10 clients, Dirichlet 0.5, every client every
round, examples-weighted averaging) with the DP recipe's protocol: Poisson rate q = 0.36,
5 local steps, 10 rounds, cosine schedule to a tenth, clip C = 1, and the noise multiplier
fedlora calibrates (PRV, delta 1e-5) for the whole run. The per-example gradients of a
linear softmax head are closed-form, so this takes seconds, not the tens of minutes of a
LoRA run: a fast answer to "can this head reach the target at this budget at all?".

Usage: python bench/head_probe.py [--lr 0.3 1 3] [--seeds 0 1] [-- overrides]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import torch

from fedlora.privacy.accounting import calibrate_noise_multiplier
from fedlora.task.config import compose_job
from fedlora.task.data import data_for, federation_partition
from fedlora.task.models import build_model

BUDGETS = (None, 8.0, 3.0, 1.0)
sigma_for = functools.lru_cache(maxsize=None)(calibrate_noise_multiplier)


@torch.no_grad()
def head_inputs(cfg: dict, dataset) -> torch.Tensor:
    """The classifier's input for every example of ``dataset``."""
    data = data_for(cfg)
    model = build_model(cfg["model"], data.num_labels)
    seen: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    ids, mask = dataset.tensors[0], dataset.tensors[1]
    for i in range(0, len(ids), 64):
        model(input_ids=ids[i:i + 64], attention_mask=mask[i:i + 64])
    return torch.cat(seen)


def train_head(x: torch.Tensor, y: torch.Tensor, parts: list[list[int]], epsilon: float | None,
               lr: float, seed: int, classes: int, q: float = 0.36, steps: int = 5,
               rounds: int = 10, clip: float = 1.0, delta: float = 1e-5
               ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.zeros(classes, x.shape[1]), torch.zeros(classes)
    for r in range(rounds):
        rate = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * r / rounds)))
        new_w, new_b, total = torch.zeros_like(weight), torch.zeros_like(bias), 0
        for part in parts:
            idx = torch.as_tensor(part)
            n = len(idx)
            q_k = round(q * n) / n  # fedlora's batch q N_k, rounded
            sigma = None if epsilon is None else \
                sigma_for(epsilon, delta, q_k, steps * rounds, "prv")
            w, b = weight.clone(), bias.clone()
            for _ in range(steps):
                pick = idx[torch.rand(n, generator=gen) < q_k]
                xs, ys = x[pick], y[pick]
                err = torch.softmax(xs @ w.T + b, -1)
                err[torch.arange(len(ys)), ys] -= 1
                g_w, g_b = err[:, :, None] * xs[:, None, :], err
                if sigma is None:
                    g_w, g_b = g_w.mean(0), g_b.mean(0)
                else:
                    norms = torch.sqrt((g_w ** 2).sum((1, 2)) + (g_b ** 2).sum(1))
                    scale = torch.clamp(clip / (norms + 1e-6), max=1.0)
                    g_w = ((g_w * scale[:, None, None]).sum(0)
                           + sigma * clip * torch.randn(w.shape, generator=gen)) / (q_k * n)
                    g_b = ((g_b * scale[:, None]).sum(0)
                           + sigma * clip * torch.randn(b.shape, generator=gen)) / (q_k * n)
                w -= rate * g_w
                b -= rate * g_b
            new_w += n * w
            new_b += n * b
            total += n
        weight, bias = new_w / total, new_b / total
    return weight, bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--poolings", nargs="+", default=["pooler", "mean"])
    args, extra = parser.parse_known_args()
    torch.set_num_threads(1)
    print("final held-out accuracy of the head alone, mean over seeds "
          f"{args.seeds}; best rate in brackets")
    for pooling in args.poolings:
        cfg = compose_job(["model.max_length=32", f"model.pooling={pooling}",
                           *[e for e in extra if e != "--"]])
        data = data_for(cfg)
        parts = [list(federation_partition(cfg, data, k).indices)
                 for k in range(int(cfg["federation"]["num_clients"]))]
        x_train, x_test = head_inputs(cfg, data.train), head_inputs(cfg, data.test)
        y_train, y_test = data.train.tensors[-1], data.test.tensors[-1]
        for epsilon in BUDGETS:
            scores = {}
            for lr in args.lr:
                accs = []
                for seed in args.seeds:
                    w, b = train_head(x_train, y_train, parts, epsilon, lr, seed,
                                      data.num_labels)
                    accs.append(((x_test @ w.T + b).argmax(-1) == y_test).float().mean().item())
                scores[lr] = statistics.mean(accs)
            best = max(scores, key=scores.get)
            row = "  ".join(f"lr {lr:g}: {acc:.3f}" for lr, acc in scores.items())
            budget = "no DP" if epsilon is None else f"eps {epsilon:g}"
            print(f"{pooling:7s} {budget:6s} {row}  [{best:g}: {scores[best]:.3f}]", flush=True)


if __name__ == "__main__":
    main()
