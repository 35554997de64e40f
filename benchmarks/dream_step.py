"""Cost of one deep-dream step: diffprobe's render loop against a hand-written loop doing the
same maths, in ONE run.

The step (thesis defaults): jitter 1, rotate ±5° and zoom [1, 1.1] (one bilinear resample),
renoise to t with fresh noise, one UNet pass stopped after ``--site`` (default
``unet.up_blocks.1``), objective = mean of one channel per item − 0.5 TV − 0.5 range, backward,
spectral gradient filter (std kept), Gaussian blur (9 taps, σ 0.5 → 0), AdamW (0.05, 0.01).
z is float32, the UNet runs under bf16 autocast on CUDA.

- ``diffprobe``: ``dream.render`` (hook engine: capture with ``detach=False`` and
  ``stop_early=True`` inside ``model.denoise``), per-step stats copied to the CPU;
- ``hand``: plain PyTorch on the native UNet: a ``register_forward_hook`` on the site that
  stores the output and raises to stop the forward, the same transforms, filters and optimiser
  written inline, one synchronisation per step.

Before timing, both loops run 3 steps with no random transforms and no filters from the same z
and must give the same z (checks that they do the same maths). Timings: ``--repeats`` runs of
``--steps`` steps each, interleaved, after a warm-up; the minimum ms/step of each. Goal:
diffprobe ≤ 1.1× hand.

CPU (small)::

    nice .venv/bin/python benchmarks/dream_step.py --model dummy --size 64 --batch 2 --steps 5
    nice .venv/bin/python benchmarks/dream_step.py --model tiny --batch 4

GPU (full-size SD1.5 with random weights, 512 px, batch 4)::

    PYTHONPATH=src python3 benchmarks/dream_step.py --full-size sd1.5 --size 512 --batch 4 \\
        --device cuda --steps 20 --repeats 3 --out benchmarks/results/dream_step_sd15_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Stop(Exception):
    pass


def build(args):
    import diffprobe

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.full_size:
        from diffprobe.testing.full_size import random_pipeline

        pipe = random_pipeline(args.full_size, args.device, dtype)
        return diffprobe.from_pipeline(pipe, name=args.full_size)
    if args.model == "dummy":
        from diffprobe.testing import dummy_sd_pipeline

        return diffprobe.from_pipeline(dummy_sd_pipeline(), name="dummy-sd").to(args.device, dtype)
    return diffprobe.load(args.model, dtype=args.dtype, device=args.device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class HandLoop:
    """The same step in plain PyTorch on the native UNet."""

    def __init__(self, model, site, channels, timestep, prompt_embeds, randomness=True):
        self.unet = model.pipe.unet
        self.module = self.unet.get_submodule(site.removeprefix("unet."))
        self.channels = torch.as_tensor(channels, device=model.device)
        self.t = timestep
        self.embeds = prompt_embeds
        self.alpha = model.pipe.scheduler.alphas_cumprod[int(timestep)].to(model.device)
        self.randomness = randomness
        self.generator = torch.Generator().manual_seed(0)
        self.autocast = model.device.type == "cuda"
        self.dtype = model.dtype
        self.device = model.device
        x = torch.linspace(-4, 4, 9, dtype=torch.float64)
        self.taps = x  # Gaussian taps are rebuilt per σ below

    def activation(self, x):
        seen = []

        def hook(module, args, output):
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            t = torch.full((len(x),), float(self.t), device=x.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                self.unet(x.to(self.dtype), t, encoder_hidden_states=self.embeds)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0].float()

    def transform(self, z):
        if not self.randomness:
            return z
        n = len(z)
        g = self.generator
        shifts = torch.randint(-1, 2, (n, 2), generator=g)
        z = torch.stack([torch.roll(z[i], tuple(shifts[i].tolist()), dims=(-2, -1))
                         for i in range(n)])  # fmt: skip
        angle = (torch.rand(n, generator=g, dtype=torch.float64) * 10 - 5) * math.pi / 180
        zoom = 1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = torch.cos(angle) / zoom
        theta[:, 0, 1], theta[:, 1, 0] = -torch.sin(angle) / zoom, torch.sin(angle) / zoom
        grid = F.affine_grid(theta.float().to(z.device), list(z.shape), align_corners=False)
        z = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        noise = torch.randn(z.shape, generator=g).to(z.device)
        return self.alpha.sqrt() * z + (1 - self.alpha).sqrt() * noise

    def filters(self, grad, step, steps):
        if not self.randomness:
            return grad
        h, w = grad.shape[-2:]
        fy = torch.fft.fftfreq(h, device=grad.device) * h
        fx = torch.fft.fftfreq(w, device=grad.device) * w
        weights = 1 / (torch.sqrt(fy[:, None] ** 2 + fx[None] ** 2) + 1)
        filtered = torch.fft.ifft2(torch.fft.fft2(grad) * weights).real
        filtered = filtered * (grad.flatten(1).std(1) / filtered.flatten(1).std(1)).view(
            -1, 1, 1, 1
        )
        sigma = 0.5 * (1 - step / max(steps - 1, 1))
        if sigma <= 0:
            return filtered
        taps = torch.exp(-0.5 * (self.taps / sigma) ** 2)
        taps = (taps / taps.sum()).float().to(grad.device)
        planes = filtered.flatten(0, 1)[:, None]
        planes = F.conv2d(F.pad(planes, (0, 0, 4, 4), mode="reflect"), taps.view(1, 1, -1, 1))
        planes = F.conv2d(F.pad(planes, (4, 4, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
        return planes.view_as(grad)

    def run(self, init, steps):
        z = init.clone().to(self.device).requires_grad_(True)
        optimizer = torch.optim.AdamW([z], lr=0.05, weight_decay=0.01)
        started = time.perf_counter()
        for step in range(steps):
            act = self.activation(self.transform(z))
            value = act.flatten(2).mean(-1).gather(1, self.channels[:, None]).squeeze(1)
            tv = (z[:, :, 1:] - z[:, :, :-1]).abs().flatten(1).mean(1) + (
                z[..., 1:] - z[..., :-1]).abs().flatten(1).mean(1)  # fmt: skip
            excess = torch.relu(z.abs() - 3).square().flatten(1).mean(1)
            total = value - 0.5 * tv - 0.5 * excess
            optimizer.zero_grad(set_to_none=True)
            (-total.sum()).backward()
            z.grad = self.filters(z.grad, step, steps)
            optimizer.step()
            total.detach().cpu()  # one synchronisation per step, as the render's stats
        sync(self.device)
        return z.detach(), (time.perf_counter() - started) / steps


def run_diffprobe(model, dream, site, channels, timestep, init, steps, randomness=True,
                  autocast=None):  # fmt: skip
    objective = (dream.channel(site, channels) - 0.5 * dream.total_variation()
                 - 0.5 * dream.range_penalty(3.0))  # fmt: skip
    result = dream.render(
        model, objective, init, timestep=timestep, steps=steps, decode_images=False,
        progress=False, snapshot_every=10**9,
        transforms=None if randomness else (), filters=None if randomness else (),
        autocast=autocast,
    )  # fmt: skip
    sync(model.device)
    return result.latents, result.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | dummy | a model alias")
    parser.add_argument("--full-size", default=None, help="random full-size alias, e.g. sd1.5")
    parser.add_argument("--site", default="unet.up_blocks.1")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--timestep", type=float, default=500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="weights: fp32 (bf16 autocast on CUDA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffprobe.interventions import dream

    model = build(args)
    shape = dream.input_shape(model, args.size)
    channels = list(range(args.batch))
    init = dream.noise_init(shape, list(range(args.batch)))
    embeds = model.encode_prompt([""] * args.batch).cond["encoder_hidden_states"]
    hand = HandLoop(model, args.site, channels, args.timestep, embeds)

    # the same maths: without randomness both loops take z to the same place
    # in float32 (no autocast, no TF32): under bf16 autocast a near-zero gradient can change
    # sign between two orderings of the same sums, and Adam moves that element by a full
    # +-lr (an H100 run: max |dz| 0.2 after 3 steps of lr 0.05, on a few elements)
    plain = HandLoop(model, args.site, channels, args.timestep, embeds, randomness=False)
    plain.autocast = False
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mine, _ = run_diffprobe(model, dream, args.site, channels, args.timestep, init, 3, False,
                            autocast=False)  # fmt: skip
    theirs, _ = plain.run(init, 3)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    gap = (mine.cpu() - theirs.cpu()).abs()
    difference, flipped = float(gap.max()), float((gap > 1e-3).float().mean())
    if model.device.type == "cuda":  # GPU kernels sum in varying order: allow rare flips
        assert flipped < 1e-3, f"the loops disagree: {flipped:.2%} of z moved apart"
    else:
        assert difference < 1e-4, f"the loops disagree: max |dz| {difference}"

    run_diffprobe(model, dream, args.site, channels, args.timestep, init, 2)  # warm-up
    hand.run(init, 2)
    times: dict[str, list[float]] = {"diffprobe": [], "hand": []}
    for _ in range(args.repeats):
        times["diffprobe"].append(run_diffprobe(model, dream, args.site, channels,
                                                args.timestep, init, args.steps)[1])  # fmt: skip
        times["hand"].append(hand.run(init, args.steps)[1])
    best = {k: min(v) * 1000 for k, v in times.items()}
    result = {
        "model": args.full_size or args.model, "site": args.site, "latent": list(shape),
        "batch": args.batch, "device": str(model.device),
        "device_name": torch.cuda.get_device_name() if model.device.type == "cuda" else
        platform.processor() or platform.machine(),
        "dtype": args.dtype, "autocast_bf16": model.device.type == "cuda",
        "steps": args.steps, "repeats": args.repeats,
        "ms_per_step": best, "ratio": best["diffprobe"] / best["hand"],
        "all_ms_per_step": {k: [t * 1000 for t in v] for k, v in times.items()},
        "same_maths_max_abs_dz": difference, "same_maths_fraction_apart": flipped, "torch": torch.__version__, "threads": args.threads,
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from diffprobe.io import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
