"""The `vgg-flax` command: parses arguments and calls the library, nothing more.

Subcommands:
  models    list the configs and builders with their parameter counts
  convert   torchvision/timm/Keras weights (.pth, .safetensors, .h5, keras-hub presets) into a
            vgg-flax weights file
  weights   pretrained weights by name: list them, download (and convert) them into the cache
  predict   top-5 ImageNet classes of image files with pretrained or converted weights
  eval      top-1/top-5 with the paper's test protocols over a TFDS split or an image folder
  explain   attribution maps (saliency, Grad-CAM, IG, ...) of image files as PNGs, or a class model
  plot      training curves of a workdir's metrics.jsonl as a PNG
  train     the training program (same as `python train.py`; its absl flags follow `train`)
  compile   the training run compiled ahead of time for a TPU slice, with no TPU: memory, FLOPs, bounds
"""

from __future__ import annotations

import argparse
import sys

from vgg_flax.cli import errors
from vgg_flax.models.heads import HEAD_SPECS
from vgg_flax.preprocessing import PRESETS


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


def _convert(args: argparse.Namespace) -> int:
    import importlib.util

    from vgg_flax.convert import engine, torch_check

    has_torch = importlib.util.find_spec("torch") is not None
    check = torch_check.self_check if has_torch and not args.no_check else None
    r = engine.convert_file(args.src, args.dst, head=args.head, verify_hash=not args.no_verify_hash,
                             check=check, preprocessing=args.preprocessing)
    if r["hash_prefix"]:
        print(f"sha256 {r['sha256']}: matches the prefix {r['hash_prefix']} in the file name")
    bn = "with" if r["batch_norm"] else "without"
    print(f"detected: VGG config {r['config']} {bn} BatchNorm, {r['layout']} layout, "
          f"{r['num_classes']} classes")
    if r["features_only"]:
        print("classifier weights are NaN (IMAGENET1K_FEATURES): saved the features only, "
              "preprocessing preset 'imagenet1k_features'")
    print(f"parameters: {r['params']:,} (head {r['head']!r})")
    print(f"preprocessing: the {r['preprocessing']!r} preset, stored with the weights")
    if r["max_abs_diff"] is not None:
        print(f"self-check vs torch at 224x224: max abs diff {r['max_abs_diff']:.3g} "
              f"(max abs output {r['max_abs_logit']:.3g})")
    elif not args.no_check:
        print("self-check skipped: torch is not installed")
    print(f"saved {args.dst}")
    return 0


def _weights_list(args: argparse.Namespace) -> int:
    from vgg_flax.convert import pretrained

    print(f"{'name':<15} {'params':>12} {'acc@1':>7} {'acc@5':>7} {'MB':>6}  preprocessing        url")
    for r in pretrained.list_pretrained():
        acc = "   -       -  " if r["features_only"] else f"{r['acc1']:7.3f} {r['acc5']:7.3f}"
        print(f"{r['name']:<15} {r['params']:>12,} {acc} {r['file_size_mb']:>6.0f}  "
              f"{r['preprocessing']:<20} {r['url']}")
    print("aliases: timm's tags (vgg16.tv_in1k ...); hub copies: hf-hub:timm/vgg16.tv_in1k ...; "
          f"license: {r['license']}")
    return 0


def _weights_download(args: argparse.Namespace) -> int:
    from vgg_flax.convert import pretrained

    for name in args.names:
        model, variables, meta = pretrained.from_pretrained(
            name, cache_dir=args.cache_dir, progress=not args.quiet, return_metadata=True)
        print(f"{name}: {model.config} batch_norm={model.batch_norm} head={model.head}, "
              f"preprocessing {meta['preprocessing']!r}, in {meta['path']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vgg_flax.convert import pretrained
    from vgg_flax.evaluation import predict

    if bool(args.weights) == bool(args.model):
        raise SystemExit("vgg-flax predict: give exactly one of --weights and --model")
    predict.check_images(args.images)  # before any weights are downloaded or read
    if args.model:
        model, variables, meta = pretrained.from_pretrained(args.model, return_metadata=True)
        results = predict.predict_with(model, variables, meta, args.images, k=args.top_k,
                                       where=args.model)
    else:
        results = predict.predict_files(args.weights, args.images, k=args.top_k)
    for path, top in zip(args.images, results, strict=True):
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {prob:7.2%}  {name}")
    return 0


def _eval_source(args: argparse.Namespace):
    """(model, variables, defaults) from a converted weights file or a training workdir."""
    if sum(map(bool, (args.weights, args.workdir, args.model))) != 1:
        raise SystemExit(f"vgg-flax {args.command}: give exactly one of --weights, --model and --workdir")
    if args.model:
        from vgg_flax.convert import pretrained

        model, variables, meta = pretrained.from_pretrained(args.model, return_metadata=True)
        return model, variables, {"normalization": meta["preprocessing"], "split": "validation",
                                  "image_size": 224, "data_dir": None, "dataset": None}
    if args.weights:
        from vgg_flax.convert import format as wformat

        model, variables = wformat.load_pretrained(args.weights)
        meta = wformat.pretrained_metadata(args.weights)
        return model, variables, {"normalization": meta["preprocessing"], "split": "validation",
                                  "image_size": 224, "data_dir": None, "dataset": None}
    from vgg_flax.train import checkpoints, workdir

    model, variables = checkpoints.load_for_inference(args.workdir, which=args.which)
    data = workdir.read_config(args.workdir)["data"]
    return model, variables, {"normalization": data["normalization"], "split": data["eval_split"],
                              "image_size": data["image_size"], "data_dir": data["data_dir"],
                              "dataset": data["dataset"]}


def _eval(args: argparse.Namespace) -> int:
    from vgg_flax import evaluation

    model, variables, defaults = _eval_source(args)  # Weights first: torch must load before TF.
    given = {"dataset": args.dataset, "split": args.split, "image_size": args.image_size,
             "data_dir": args.data_dir, "normalization": args.normalization}
    run = {k: defaults[k] if v is None else v for k, v in given.items()}
    if not run["dataset"]:
        raise SystemExit("vgg-flax eval: --dataset is required with --weights / --model")
    scales = [int(q) for q in args.scales.split(",")] if args.scales else None
    max_views = "auto" if args.max_views is None else args.max_views or None
    results = evaluation.evaluate(
        model, variables, run["dataset"], run["split"], image_size=run["image_size"],
        protocols=args.protocols.split(","), scales=scales, batch_size=args.batch_size,
        data_dir=run["data_dir"], normalization=run["normalization"], multicrop_grid=args.grid,
        dense_images="whole" if args.dense_whole_image else "square", max_views=max_views)
    print(evaluation.format_table(results))
    if args.output:
        evaluation.save_json(results, args.output, weights=args.weights or args.model or args.workdir,
                             dense_whole_image=args.dense_whole_image, **run)
        print(f"saved {args.output}")
    return 0


def _explain_precheck(args: argparse.Namespace) -> list[str]:
    """The checks that need no weights: methods, target, images; for registry weights (which would
    be downloaded) the class range and the tap as well."""
    from vgg_flax import models
    from vgg_flax.convert import registry
    from vgg_flax.explain import pictures

    methods = pictures.check_methods(args.method.split(","))
    if args.target != "top1" and not args.target.isdigit():
        raise ValueError(f"--target must be 'top1' or a class index >= 0, got {args.target!r}")
    if methods == [pictures.CLASS_MODEL] and args.target == "top1":
        raise ValueError("--method class-model needs --target N, the class to visualise")
    if methods != [pictures.CLASS_MODEL]:
        if not args.images:
            raise ValueError("no images given")
        pictures.check_images(args.images)
    if args.model and args.model in {**registry.REGISTRY, **registry.ALIASES}:
        entry = registry.get(args.model)
        _explain_check_model(models.get_model(entry.builder), args, features_only=entry.features_only)
    return methods


def _explain_check_model(model, args: argparse.Namespace, features_only: bool = False) -> None:
    from vgg_flax.explain import maps

    if features_only or model.head == "none":
        raise ValueError(f"{args.model or args.weights or args.workdir} holds features only (no "
                         "classifier): nothing to explain")
    if args.target != "top1" and int(args.target) >= model.num_classes:
        raise ValueError(f"--target {args.target} out of range: the model has {model.num_classes} "
                         f"classes (0..{model.num_classes - 1})")
    if args.tap is not None:
        maps.check_cam_tap(model, args.tap)


def _explain(args: argparse.Namespace) -> int:
    import dataclasses

    from vgg_flax import preprocessing
    from vgg_flax.data.classes import imagenet_classes
    from vgg_flax.explain import pictures

    methods = _explain_precheck(args)
    model, variables, defaults = _eval_source(args)
    _explain_check_model(model, args)
    size = args.image_size or defaults["image_size"]
    norm = preprocessing.get_preset(args.normalization or defaults["normalization"])
    if args.image_size or args.workdir:  # the run's own size: resize the short side to it, no crop margin
        norm = dataclasses.replace(norm, resize=size, crop=size)
    classes = imagenet_classes() if model.num_classes == 1000 else None
    if args.weights:
        from vgg_flax.convert import format as wformat

        classes = wformat.pretrained_metadata(args.weights)["classes"] or classes
    target = None if args.target == "top1" else int(args.target)
    if methods == [pictures.CLASS_MODEL]:
        print(pictures.class_model_file(model, variables, norm, target, args.out, classes=classes,
                                        steps=args.steps))
        return 0
    written = pictures.explain_files(model, variables, norm, args.images, methods, args.out,
                                     target=target, classes=classes, progress=not args.quiet,
                                     tap=args.tap, steps=args.steps, samples=args.samples)
    print("\n".join(written))
    return 0


def _train(args: argparse.Namespace) -> int:
    """Hands every argument after `train` to the absl program (argparse would eat `--flags`)."""
    from vgg_flax.cli import train_app

    train_app.run(["vgg-flax train", *args.flags])
    return 0


def _compile(args: argparse.Namespace) -> int:
    """Hands every argument after `compile` to its own parser (--config.KEY=V are absl's)."""
    from vgg_flax.cli import compile_app

    return compile_app.main(args.flags)


def _plot(args: argparse.Namespace) -> int:
    from vgg_flax.train import plots

    print(plots.plot_metrics(args.workdir, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgg-flax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list VGG builders and parameter counts")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--head", default="torchvision")
    p.set_defaults(func=_models)

    p = sub.add_parser("plot", help="training curves of a workdir's metrics.jsonl as a PNG")
    p.add_argument("workdir")
    p.add_argument("--out", help="default: WORKDIR/curves.png")
    p.set_defaults(func=_plot)

    p = sub.add_parser("convert", help="convert torchvision/timm/Keras VGG weights to a vgg-flax file")
    p.add_argument("src", help="a .pth/.pt/.bin or .safetensors state dict, a Keras .h5 file or a "
                               "keras-hub preset directory")
    p.add_argument("dst", help="the .safetensors file to write (weights, config, preprocessing)")
    p.add_argument("--head", default="torchvision",
                   choices=[name for name, head in HEAD_SPECS.items() if head.torchvision_layout])
    p.add_argument("--no-verify-hash", action="store_true",
                   help="skip the sha256 check of a hash prefix in the file name")
    p.add_argument("--no-check", action="store_true", help="skip the self-check against torch")
    p.add_argument("--preprocessing", choices=sorted(PRESETS),
                   help="the preset to store instead of the one the source's layout implies")
    p.set_defaults(func=_convert)

    p = sub.add_parser("weights", help="pretrained weights by name: list, download")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("list", help="the registry: names, accuracy, size, URL, preprocessing")
    w.set_defaults(func=_weights_list)
    w = wsub.add_parser("download", help="download and convert into the cache ($VGG_FLAX_HOME)")
    w.add_argument("names", nargs="+", help="registry names, hf-hub:ORG/REPO or URLs")
    w.add_argument("--cache-dir", help="default: $VGG_FLAX_HOME or ~/.cache/vgg_flax")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=_weights_download)

    p = sub.add_parser("predict", help="top-k classes of images with pretrained or converted weights")
    p.add_argument("--weights", help="a file written by `vgg-flax convert`")
    p.add_argument("--model", help="pretrained weights by name (vgg16, hf-hub:..., URL; see `weights list`)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_predict)

    p = sub.add_parser("eval", help="top-1/top-5 with the paper's test protocols")
    p.add_argument("--weights", help="a file written by `vgg-flax convert` (or save_pretrained)")
    p.add_argument("--model", help="pretrained weights by name (vgg16, hf-hub:..., URL)")
    p.add_argument("--workdir", help="a training workdir (its config gives the dataset defaults)")
    p.add_argument("--which", default="latest", choices=("latest", "best"), help="workdir checkpoint")
    p.add_argument("--dataset", help="TFDS name, 'sklearn_digits' or 'folder:/path'")
    p.add_argument("--split", help="default: 'validation' (--weights) or the run's eval split")
    p.add_argument("--data-dir")
    p.add_argument("--image-size", type=int, help="crop size S (default 224 or the run's)")
    p.add_argument("--normalization", help="preset (default: the weights' or the run's)")
    p.add_argument("--protocols", default="center",
                   help="comma list of center, dense, multicrop, dense+multicrop")
    p.add_argument("--scales", help="comma list of test scales Q (default: round(S * 256 / 224), "
                                    "or S for fixed-size datasets)")
    p.add_argument("--grid", type=int, default=5, help="multi-crop grid (grid x grid x 2 flips)")
    p.add_argument("--dense-whole-image", action="store_true",
                   help="dense protocol on the whole image, one at a time (default: Q x Q center square)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-views", type=int,
                   help="at most this many crop-sized views per device per network call, to bound "
                        "memory (default: from the memory budget, evaluation.views_per_call; 0: no limit)")
    p.add_argument("--output", help="write the results as JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("explain", help="attribution maps of images as PNGs, or a class model")
    p.add_argument("--weights", help="a file written by `vgg-flax convert` (or save_pretrained)")
    p.add_argument("--model", help="pretrained weights by name (vgg16, hf-hub:..., URL)")
    p.add_argument("--workdir", help="a training workdir (its config gives the size and preset)")
    p.add_argument("--which", default="latest", choices=("latest", "best"), help="workdir checkpoint")
    p.add_argument("--method", default="grad-cam",
                   help="comma list of saliency, grad-cam, grad-cam++, integrated-gradients, "
                        "smooth-grad; or class-model (alone, with --target N)")
    p.add_argument("--target", default="top1", help="'top1' (each image's) or a class index")
    p.add_argument("--tap", help="Grad-CAM's layer (default: the last conv's ReLU, e.g. relu5_3)")
    p.add_argument("--steps", type=int, help="Integrated Gradients' steps (50) / class-model's (200)")
    p.add_argument("--samples", type=int, help="SmoothGrad's noisy copies (50)")
    p.add_argument("--image-size", type=int, help="input size (default: 224 center crop, or the run's)")
    p.add_argument("--normalization", help="preset (default: the weights' or the run's)")
    p.add_argument("--out", default="explain", help="directory for the PNGs (default ./explain)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("images", nargs="*")
    p.set_defaults(func=_explain)

    p = sub.add_parser("train", help="train (flags as train.py: --workdir, --config, --config.KEY=V)",
                       add_help=False)
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(func=_train)

    p = sub.add_parser("compile", help="compile the training run for a TPU slice, with no TPU "
                                       "(--topology, --config, --config.KEY=V)", add_help=False)
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(func=_compile)
    for name, p in sub.choices.items():
        if name not in ("train", "compile"):  # these programs have their own --debug
            p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return _train(argparse.Namespace(flags=argv[1:]))
    if argv[:1] == ["compile"]:
        return _compile(argparse.Namespace(flags=argv[1:]))
    args = build_parser().parse_args(argv)
    return errors.run_command(f"vgg-flax {args.command}", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
