"""Training throughput of diffprobe's SAE trainer against EleutherAI sparsify's, in one process.

sparsify's ``Trainer`` is built around a language model (it hooks the model and trains on its
activations), so the comparison times its lowest level, the work its trainer does per step
for ``loss_fn="fvu"``, ``optimizer="adam"`` (sparsify/trainer.py ``fit``): decoder renormalised,
``SparseCoder.forward`` (fused TopK encoder, sparse decoder, FVU + AuxK), backward, parallel
decoder gradient removed, ``torch.optim.Adam`` step, linear LR schedule step, dead-latent
bookkeeping, ``float(fvu)``. diffprobe's side is ``SAETrainer.step`` (sparse backward through
sparse x dense products, fused Adam). Both see the same random activations, the same sizes,
per-token TopK (sparsify has no BatchTopK) and AuxK alpha 1/32, in two cases: no dead latents
(AuxK idle, as early in training) and half the latents dead (AuxK active; the same dead set is
given to both). Timed methods alternate order each repeat; the figure is the ratio of the
medians (> 1: diffprobe is faster).

Install sparsify beside, not into, the environment (never let pip touch torch):

    pip install --no-deps --target .carry/site eai-sparsify==1.3.3 einops natsort \\
        simple-parsing docstring-parser
    PYTHONPATH=src .venv/bin/python benchmarks/sae_train.py              # CPU, d_in 256
    PYTHONPATH=src python benchmarks/sae_train.py --device cuda --d-in 1280 --batch 4096 \\
        --out benchmarks/results/sae-train-gpu.json                     # SD1.5 up_blocks.1
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_sparsify(site: Path):
    """sparsify's SparseCoder and config without its package ``__init__`` (which imports the
    LLM trainer and its dependencies: datasets, transformers' schedules, schedulefree)."""
    sys.path.insert(0, str(site))
    package = types.ModuleType("sparsify")
    package.__path__ = [str(site / "sparsify")]
    sys.modules["sparsify"] = package
    coder = importlib.import_module("sparsify.sparse_coder")
    config = importlib.import_module("sparsify.config")
    from importlib.metadata import PathDistribution

    version = PathDistribution(next(site.glob("eai_sparsify-*.dist-info"))).version
    return coder.SparseCoder, config.SparseCoderConfig, version


class SparsifyStep:
    """One step of sparsify's Trainer.fit for the FVU loss with Adam, on a given batch."""

    def __init__(self, SparseCoder, SparseCoderConfig, d_in, d_sae, k, lr, steps, device, seed):
        torch.manual_seed(seed)
        self.sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device,
                               dtype=torch.float32)  # fmt: skip
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: 1 - s / steps)  # fmt: skip
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.started = False

    def __call__(self, x: torch.Tensor, dead_mask: torch.Tensor | None, aux_alpha: float):
        sae = self.sae
        if not self.started:
            sae.b_dec.data = x.mean(0)
            self.started = True
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=dead_mask)
        self.did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        loss = out.fvu + aux_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        with torch.no_grad():
            self.since_fired += len(x)
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        return fvu


def diffprobe_step(d_in, d_sae, k, lr, aux_alpha, device, seed, dead_tokens):
    from diffprobe.sae import SAETrainer, TopKSAE, TrainConfig

    sae = TopKSAE(d_in, d_sae, k, seed=seed, device=device)
    config = TrainConfig(k=k, batch_topk=False, aux_alpha=aux_alpha, lr=lr,
                         dead_tokens=dead_tokens)  # fmt: skip
    return SAETrainer(sae, config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sparsify", type=Path, default=ROOT / ".carry" / "site",
                        help="folder where eai-sparsify was installed with --target")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    SparseCoder, SparseCoderConfig, sparsify_version = import_sparsify(args.sparsify)
    d_in, k, batch = args.d_in, args.k, args.batch
    d_sae = d_in * args.expansion
    lr, aux_alpha = 4e-4, 1 / 32
    total = args.warmup + args.steps * args.repeats
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d_in, generator=generator).to(device) for _ in range(8)]
    half_dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    half_dead[::2] = True

    cases = {}
    for case, dead in (("auxk_idle", None), ("auxk_half_dead", half_dead)):
        ours = diffprobe_step(d_in, d_sae, k, lr, aux_alpha, device, 0, dead_tokens=10**12)
        theirs = SparsifyStep(SparseCoder, SparseCoderConfig, d_in, d_sae, k, lr, total,
                              device, 0)  # fmt: skip

        def run_ours(x, ours=ours, dead=dead):
            if dead is not None:  # the same dead set as sparsify's, every step
                ours.tokens_since_fired.masked_fill_(dead, 10**12)
            return ours.step(x)

        def run_theirs(x, theirs=theirs, dead=dead):
            return theirs(x, dead, aux_alpha)

        methods = {"diffprobe": run_ours, "sparsify": run_theirs}
        for method in methods.values():
            for i in range(args.warmup):
                method(data[i % len(data)])
        synchronize(device)
        times: dict[str, list[float]] = {name: [] for name in methods}
        order = list(methods)
        for repeat in range(args.repeats):
            for name in order[repeat % 2 :] + order[: repeat % 2]:
                synchronize(device)
                began = time.perf_counter()
                for i in range(args.steps):
                    methods[name](data[i % len(data)])
                synchronize(device)
                times[name].append(time.perf_counter() - began)
        tokens = args.steps * batch
        median = {name: statistics.median(t) for name, t in times.items()}
        cases[case] = {
            "tokens_per_second": {n: round(tokens / m, 1) for n, m in median.items()},
            "seconds_per_step_median": {n: m / args.steps for n, m in median.items()},
            "seconds_per_repeat": times,
            "ratio": round(median["sparsify"] / median["diffprobe"], 3),
        }
        print(f"{case}: diffprobe {tokens / median['diffprobe']:,.0f} tok/s, sparsify "
              f"{tokens / median['sparsify']:,.0f} tok/s, ratio "
              f"{cases[case]['ratio']:.2f}x", file=sys.stderr)  # fmt: skip

    result = {
        "benchmark": "sae_train",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch": batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "sparsify": sparsify_version,
        "commit": _commit(),
        "cases": cases,
        "ratio": min(c["ratio"] for c in cases.values()),
    }
    if args.out is not None:
        from diffprobe.io import write_json

        write_json(args.out, result)
    print(result["ratio"])
    return result


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
