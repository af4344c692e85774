"""Attribution speed on this machine: vgg_flax.explain vs pytorch-grad-cam and captum (PyTorch eager).

    .venv/bin/python bench/explain.py [--batch 8] [--size 224] [--steps 32] [--ig-size 224]
                                         [--repeats 3] [--ig-repeats 2]

Both get the same random torchvision VGG16 (converted with `vgg_flax.load_torchvision`), the same
images and the same target classes. Timed: Grad-CAM at relu5_3 (the upsampled, scaled map of both;
pytorch-grad-cam's `GradCAM`) and Integrated Gradients with `--steps` Gauss-Legendre points from a
zero baseline (captum's `IntegratedGradients`, `internal_batch_size` = ours: the same images per
network call). Ours is jitted once (compile time reported apart), on the conv path `--conv-impl`
("auto": the CPU Winograd path on CPU). Calls are interleaved (A B A B) so both run under the same
background load; medians of the repeats (Grad-CAM after one untimed call each, IG without:
one IG call is batch x steps network passes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _setup(args):
    import torch
    import torchvision

    import vgg_flax

    torch.manual_seed(0)
    reference = torchvision.models.vgg16().eval()
    model, variables = vgg_flax.load_torchvision(reference.state_dict())
    model = model.clone(conv_impl=args.conv_impl)
    x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    targets = np.arange(args.batch) * 97 % 1000
    return reference, model, variables, x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--ig-size", type=int, help="IG's image side (default --size): one IG call is "
                                               "batch x steps network passes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ig-repeats", type=int, default=2)
    p.add_argument("--internal-batch", type=int,
                   help="images per network call in IG, both sides (default 4 x batch)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "cpu"))
    args = p.parse_args(argv)

    import jax
    from captum.attr import IntegratedGradients
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from vgg_flax import explain

    print(common.header(sys.argv))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    reference, model, variables, x, tx, targets = _setup(args)
    ig_size = args.ig_size or args.size
    ig_x, ig_tx = x[:, :ig_size, :ig_size], tx[:, :, :ig_size, :ig_size].contiguous()
    internal = args.internal_batch or args.batch * 4  # path points x images per call, both sides

    def ours_cam():
        return jax.block_until_ready(explain.grad_cam(model, variables, x, targets, tap="relu5_3"))

    def ours_ig():
        return jax.block_until_ready(explain.integrated_gradients(
            model, variables, ig_x, targets, steps=args.steps, internal_batch=internal))

    cam = GradCAM(model=reference, target_layers=[reference.features[29]])  # relu5_3
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    ig = IntegratedGradients(reference)

    def torch_ig():
        return ig.attribute(ig_tx, baselines=ig_tx * 0, target=[int(t) for t in targets], n_steps=args.steps,
                            method="gausslegendre", internal_batch_size=internal)

    for name, f in (("grad_cam", ours_cam), ("integrated_gradients", ours_ig)):
        start = time.perf_counter()
        f()
        print(f"ours {name}: compile + first call {time.perf_counter() - start:.2f} s")
    times = common.interleaved(
        {"ours Grad-CAM": ours_cam, "grad-cam Grad-CAM": lambda: cam(input_tensor=tx, targets=cam_targets)},
        warmup=args.warmup, repeats=args.repeats)
    # IG runs batch x steps images per call: no untimed warm-up beyond ours' compile call above.
    times.update(common.interleaved({"ours IG": ours_ig, "captum IG": torch_ig}, warmup=0,
                                    repeats=args.ig_repeats))
    print(f"VGG16, batch {args.batch} at {args.size}x{args.size} (IG at {ig_size}x{ig_size}, {internal} "
          f"images per call), IG {args.steps} steps, conv_impl "
          f"{args.conv_impl!r}, {args.repeats} repeats (median s; all times {times})")
    for name, t in times.items():
        print(f"  {name:20s} {common.median(t):8.2f} s  {args.batch / common.median(t):6.2f} images/s")
    for ours, theirs in (("ours Grad-CAM", "grad-cam Grad-CAM"), ("ours IG", "captum IG")):
        ratio = common.median(times[theirs]) / common.median(times[ours])
        print(f"  {ours} vs {theirs}: ours is {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()
