"""The `vgg-flax` command: parses arguments and calls the library, nothing more.

Subcommands:
  models    list the configs and builders with their parameter counts
"""

from __future__ import annotations

import argparse
import sys


def _models(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from vgg_flax import models

    print(f"{'builder':<11} {'config':<6} {'bn':<3} {'params (1000 classes)':>22}")
    for name, builder in models.MODELS.items():
        model = builder(num_classes=args.num_classes, head=args.head)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        cfg = builder.keywords["config"]
        bn = "yes" if builder.keywords.get("batch_norm") else "no"
        print(f"{name:<11} {cfg:<6} {bn:<3} {models.count_params(shapes):>22,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgg-flax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list VGG builders and parameter counts")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--head", default="torchvision")
    p.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
