"""Cost of one h-space training step (Asyrp: ε and ε̃ passes, backward through the decoder
half to Δh, VAE decode of P_t, CLIP image encoder, directional + L1 loss, optimiser step).

    # CPU, the embedded model (docs/hspace.md)
    python benchmarks/hspace_cost.py --model tiny --batch 4 --repeats 3
    # GPU, SD1.5 size with random weights (mid block 1280×8×8 at 512 px; a ViT-B/16-size CLIP
    # with random weights as Asyrp's judge)
    python benchmarks/hspace_cost.py --model sd1.5 --device cuda --dtype bf16 --batch 4 --repeats 10

Writes benchmarks/results/hspace_cost_<model>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def vit_b16_clip():
    """A CLIPModel of ViT-B/16 size with random weights and a 77-token text tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: F401

    config = CLIPConfig(
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=512,
    )
    return CLIPModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--kind", default="conv", choices=["conv", "transformer", "free"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffprobe
    from diffprobe.interventions.hspace import HSpaceEdit, build_delta, decode, h_shape
    from diffprobe.interventions.hspace.clip import ClipScorer, load_clip
    from diffprobe.interventions.hspace.process import _conditioning, denoise_pair, predicted_x0
    from diffprobe.interventions.hspace.training import directional_loss
    from diffprobe.loading import from_pipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.model in ("tiny", "tiny-ddpm"):
        model = diffprobe.load(args.model, device=args.device)
        scorer = load_clip("tiny-clip")
    else:
        from diffprobe.testing.full_size import random_pipeline

        model = from_pipeline(random_pipeline(args.model, device=args.device, dtype=dtype),
                              None, f"{args.model}-random")  # fmt: skip
        clip = vit_b16_clip().to(args.device, dtype)
        tokenizer = load_clip("tiny-clip").tokenizer  # only the shape of text inputs matters
        scorer = ClipScorer(clip, tokenizer, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28),
                            "random ViT-B/16", ("{}",))  # fmt: skip
    scorer.model.to(args.device)
    scorer.mean, scorer.std = scorer.mean.to(args.device), scorer.std.to(args.device)
    shape = h_shape(model)
    delta = build_delta(args.kind, shape, 40).to(args.device, dtype)
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.5)
    hspace = HSpaceEdit([delta], t_edit=0, train_steps=40)
    size = model.resolution
    x0 = model.encode_images(torch.zeros(args.batch, 3, size, size, device=args.device))
    x_t = torch.randn_like(x0)
    cond = _conditioning(model, None, args.batch)
    text = torch.nn.functional.normalize(torch.randn(scorer.model.config.projection_dim,
                                                     device=args.device), dim=0)  # fmt: skip
    alpha = model.pipe.scheduler.alphas_cumprod[500].to(args.device)
    with torch.no_grad():
        reference = scorer.images(decode(model, x0))

    def step() -> None:
        eps, eps_edit = denoise_pair(model, x_t, 500, cond, None, hspace, 40, grad=True)
        p_edit = decode(model, predicted_x0(x_t, eps_edit, alpha, None))
        with torch.no_grad():
            p_ref = decode(model, predicted_x0(x_t, eps, alpha, None))
        loss = directional_loss(scorer.images(p_edit) - reference, text.float()).mean()
        loss = loss + 3.0 * (p_edit - p_ref).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    result = {
        "model": args.model, "kind": args.kind, "device": args.device, "dtype": args.dtype,
        "batch": args.batch, "h_shape": list(shape), "image_size": size,
        "delta_parameters": sum(p.numel() for p in delta.parameters()),
        "seconds_per_step": sorted(times)[len(times) // 2], "all_seconds": times,
        "threads": torch.get_num_threads(), "host": platform.node(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
        if args.device.startswith("cuda") else None,
    }  # fmt: skip
    out = Path(
        args.out or f"benchmarks/results/hspace_cost_{args.model}_{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
