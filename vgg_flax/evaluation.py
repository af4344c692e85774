"""Top-1/top-5 evaluation with the paper's test protocols (Simonyan & Zisserman, 2014, Sec. 3.2, 4.2-4.3).

Protocols (each at one or several test scales Q, the short side the image is resized to; the
posteriors of several scales are averaged):

    center           the center S x S crop (torchvision's Resize(Q) + CenterCrop(S) preset)
    dense            the paper's dense evaluation: FC layers as convolutions over the resized image
                     (by default its Q x Q center square, see below), class scores averaged over the
                     map, softmax averaged with the horizontally flipped image's
    multicrop        a 5 x 5 grid of S x S crops spanning the resized image, and their flips:
                     softmax averaged over the 50 crops
    dense+multicrop  the average of the dense and multi-crop posteriors (the paper's Table 6)

    results = evaluate(model, variables, "imagenet2012", "validation", image_size=224,
                       protocols=("center", "dense", "multicrop"), scales=(256, 384, 512))
    print(format_table(results)); save_json(results, "eval.json")

With several devices, each batch is split over a 1-D "data" mesh of all devices (batch_size must be
a multiple of the local device count) and the variables are replicated; the same code runs multi-host.

Dense evaluation sees the whole resized image, as in the paper, with dense_images="whole"; images then
go one at a time on one device, compiled once per distinct image shape (hundreds on ImageNet). The
default dense_images="square" takes the Q x Q center square so that images batch (identical for square
datasets). Multi-crop always spans the whole resized image. Metrics are sums of correct
predictions over real examples and their count (padded examples masked, never dropped), summed over
processes and divided once. Models with the "torchvision" head are evaluated densely with the same
weights through head="dense"; the "small" and "dense" heads already accept any input size.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vgg_flax import parallel
from vgg_flax.topk import topk_hits

PROTOCOLS = ("center", "dense", "multicrop", "dense+multicrop")
# The input pipeline's view of each basic protocol.
_VIEWS = {"center": "center", "dense": "full", "multicrop": "multicrop"}


def dense_model(model):
    """The module for dense evaluation: head "dense" for a "torchvision" head (same weights)."""
    if model.head == "torchvision":
        return model.clone(head="dense")
    if model.head in ("dense", "small"):
        return model
    raise ValueError(f"cannot classify with head {model.head!r}")


def posterior_fn(model, protocol: str):
    """A jitted fn(variables, images) -> float32[B, classes] softmax posteriors of one view batch.

    images: float32[B, S, S, 3] ("center"), float32[B, Q, Q, 3] ("dense"; the mean with its flip) or
    float32[B, V, S, S, 3] ("multicrop"; the mean over V crops).
    """
    import jax
    import jax.numpy as jnp

    def probs(net, variables, x):
        return jax.nn.softmax(net.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

    if protocol == "center":
        return jax.jit(functools.partial(probs, model))
    if protocol == "dense":
        net = dense_model(model)
        return jax.jit(lambda v, x: 0.5 * (probs(net, v, x) + probs(net, v, x[:, :, ::-1])))
    if protocol == "multicrop":
        def multi(v, x):
            b, views = x.shape[:2]
            return probs(model, v, x.reshape((b * views,) + x.shape[2:])).reshape(b, views, -1).mean(1)
        return jax.jit(multi)
    raise KeyError(f"unknown protocol {protocol!r}; valid: {PROTOCOLS[:3]}")


def posteriors(model, variables, name: str, split: str, *, protocol: str, scale: int, image_size: int,
               batch_size: int, data_dir: str | None = None, normalization: str = "torchvision",
               multicrop_grid: int = 5, dense_images: str = "square", process_index: int | None = None,
               process_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This process's (float32[n, classes] posteriors, int32[n] labels) of one protocol at scale Q.

    Rows follow the split's fixed evaluation order; padding is removed, so n is this process's exact
    share of the split. For "multicrop" the network sees batch_size * 2 * grid**2 crops per call;
    dense_images="whole" evaluates one whole image per call on one device (see the module docstring).
    """
    from vgg_flax.data import pipeline as input_pipeline

    if dense_images not in ("square", "whole"):
        raise KeyError(f"dense_images must be 'square' or 'whole', not {dense_images!r}")
    whole = protocol == "dense" and dense_images == "whole"
    view, batch_size = ("whole", 1) if whole else (_VIEWS[protocol], batch_size)
    fn = posterior_fn(model, protocol)
    mesh = None if whole else _data_mesh(batch_size)
    if mesh is not None:
        variables = jax.device_put(variables, parallel.replicated(mesh))
    batches = input_pipeline.create_dataset(
        name, split, batch_size=batch_size, train=False, image_size=image_size, data_dir=data_dir,
        normalization=normalization, process_index=process_index, process_count=process_count,
        eval_views=view, eval_resize=scale, multicrop_grid=multicrop_grid)
    probs, labels = [], []
    for batch in batches:
        images = batch["image"] if mesh is None else parallel.global_array(batch["image"], mesh)
        out = parallel.local_rows(fn(variables, images), mesh)
        probs.append(out[batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(probs), np.concatenate(labels)


def _data_mesh(batch_size: int):
    """The "data" mesh over every device when there are several (None: plain single-device jit)."""
    if jax.device_count() == 1:
        return None
    if batch_size % jax.local_device_count():
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {jax.local_device_count()} "
                         "local devices")
    return parallel.create_mesh()


def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows rank their label among the k highest posteriors (`vgg_flax.topk`'s tie rule:
    the lower index first)."""
    return int(np.sum(topk_hits(probs, labels, k)))


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """{"top1", "top5", "count"}: sums over this process, summed over all processes, divided once."""
    sums = np.asarray([topk_correct(probs, labels, 1), topk_correct(probs, labels, 5), len(labels)],
                      np.int64)
    sums = parallel.sum_over_processes(sums)
    count = int(sums[2])
    return {"top1": float(sums[0] / max(count, 1)), "top5": float(sums[1] / max(count, 1)), "count": count}


def evaluate(model, variables, name: str, split: str, *, image_size: int = 224,
             protocols: Sequence[str] = ("center",), scales: Sequence[int] | None = None,
             batch_size: int = 32, data_dir: str | None = None, normalization: str = "torchvision",
             multicrop_grid: int = 5, dense_images: str = "square", process_index: int | None = None,
             process_count: int | None = None) -> dict[str, dict[str, Any]]:
    """Top-1/top-5 of each protocol over a split (or "folder:/root" split).

    Args:
      model, variables: a VGG module and its {"params"[, "batch_stats"]}.
      name, split, data_dir: as `vgg_flax.input_pipeline.create_dataset`.
      image_size: the crop size S (center and multi-crop views).
      protocols: names from PROTOCOLS.
      scales: test scales Q; posteriors are averaged over them. Default: the pipeline's single
        default Q (round(S * 256 / 224), or S for fixed-size datasets such as the digits).
      batch_size: images per call (multi-crop: times 2 * grid**2 crops).
      dense_images: "square" (batched) or "whole" (the paper's; one image per call).
    Returns:
      {protocol: {"top1", "top5" (fractions), "count" (examples), "scales" (list)}}.
    """
    from vgg_flax.data import pipeline as input_pipeline

    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise KeyError(f"unknown protocols {unknown}; valid: {PROTOCOLS}")
    if not scales:
        info = input_pipeline.dataset_info(name, data_dir=data_dir)
        from vgg_flax.preprocessing import get_preset

        scales = [input_pipeline.default_eval_resize(image_size, info.image_shape is not None,
                                                     get_preset(normalization))]
    needed = sorted({part for p in protocols for part in p.split("+")})
    kw = dict(image_size=image_size, batch_size=batch_size, data_dir=data_dir, normalization=normalization,
              multicrop_grid=multicrop_grid, dense_images=dense_images, process_index=process_index,
              process_count=process_count)
    averaged, labels = {}, None
    for protocol in needed:
        per_scale = [posteriors(model, variables, name, split, protocol=protocol, scale=q, **kw)
                     for q in scales]
        averaged[protocol] = np.mean([p for p, _ in per_scale], axis=0)
        labels = per_scale[0][1]
    results = {}
    for protocol in protocols:
        probs = np.mean([averaged[part] for part in protocol.split("+")], axis=0)
        results[protocol] = {**metrics(probs, labels), "scales": [int(q) for q in scales]}
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The results as a text table: protocol, scales, top-1 and top-5 accuracy and error, count."""
    lines = [f"{'protocol':<16} {'scales':<14} {'top-1':>7} {'top-5':>7} {'err-1':>7} {'err-5':>7} "
             f"{'count':>8}"]
    for protocol, r in results.items():
        scales = ",".join(str(q) for q in r["scales"])
        lines.append(f"{protocol:<16} {scales:<14} {r['top1']:>7.2%} {r['top5']:>7.2%} "
                     f"{1 - r['top1']:>7.2%} {1 - r['top5']:>7.2%} {r['count']:>8}")
    return "\n".join(lines)


def save_json(results: dict[str, dict[str, Any]], path: str, **context) -> None:
    """Writes {"results": results, **context} (e.g. dataset, split, weights) as JSON."""
    with open(path, "w") as f:
        json.dump({"results": results, **context}, f, indent=2, sort_keys=True)
        f.write("\n")
