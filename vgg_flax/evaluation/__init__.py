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

One evaluator (`Evaluator`) serves `vgg-flax eval` and training (which evaluates with "center"):
each batch is split over a 1-D "data" mesh of all devices (batch_size must be a multiple of the local
device count), the variables are replicated, and the same code runs multi-host; the input pipeline
gives every process the same number of batches (the last padded, then all-masked ones), which is the
only padding rule.

Dense evaluation sees the whole resized image, as in the paper, with dense_images="whole"; images then
go one at a time on one device, compiled once per distinct image shape (hundreds on ImageNet). The
default dense_images="square" takes the Q x Q center square so that images batch (identical for square
datasets). Multi-crop always spans the whole resized image. Metrics are sums of correct
predictions over real examples and their count (padded examples masked, never dropped), summed over
processes and divided once. Models with the "torchvision" head are evaluated densely with the same
weights through head="dense"; the "small" and "dense" heads already accept any input size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from vgg_flax import parallel
from vgg_flax.evaluation.topk import topk_hits
from vgg_flax.models.configs import conv_width, is_conv_layer, is_pool_layer, layer_names

# Evaluation memory is a budget, not a view count: one network call's activations may take this
# fraction of a device's memory (on CPU, of the host's, shared by its devices); the rest holds the
# batch's views, the weights and XLA's temporaries (the arithmetic and measured peaks:
# docs/PERFORMANCE.md, "Evaluation memory").
MEMORY_FRACTION = 1 / 8


def device_memory() -> int:
    """Bytes one local device may use: its allocator's limit (GPU, TPU), or on CPU the host's
    physical memory divided by the local device count."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def activation_bytes(model, pixels: int) -> int:
    """Bytes inference keeps alive per view of `pixels` input pixels: the input and output of the
    widest conv (its width / 4**pools before it, per input pixel), in the model's dtype."""
    widest, pools = 3.0, 0
    for name, entry in layer_names(model.config):
        if is_pool_layer(name):
            pools += 1
        elif is_conv_layer(name):
            widest = max(widest, conv_width(entry)[0] / 4**pools)
    return int(2 * pixels * widest * np.dtype(model.dtype).itemsize)


def views_per_call(model, image_size: int, memory: int | None = None) -> int:
    """image_size x image_size views per device per network call within MEMORY_FRACTION of `memory`
    bytes (default: `device_memory()`)."""
    memory = device_memory() if memory is None else memory
    return max(1, int(memory * MEMORY_FRACTION) // activation_bytes(model, image_size**2))


def dense_model(model):
    """The module for dense evaluation: head "dense" for a "torchvision" head (same weights)."""
    if model.head == "torchvision":
        return model.clone(head="dense")
    if model.head in ("dense", "small"):
        return model
    raise ValueError(f"cannot classify with head {model.head!r}")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: what the pipeline feeds it and how its posterior is formed.

    views: the pipeline's eval view (a key of `vgg_flax.data.transforms.EVAL_VIEWS`).
    net: fn(model) -> the module that classifies those views.
    arrange: fn(images of one batch) -> float32[B, V, h, w, 3], the views whose softmax is averaged.
    """

    views: str
    net: Callable
    arrange: Callable


def _flipped_pair(x):
    import jax.numpy as jnp

    return jnp.stack([x, x[:, :, ::-1]], axis=1)


# The evaluation protocols (see the module docstring); names joined by "+" average their posteriors
# ("dense+multicrop", the paper's Table 6). A new protocol is a row here.
PROTOCOLS: dict[str, Protocol] = {
    "center": Protocol("center", lambda model: model, lambda x: x[:, None]),
    "dense": Protocol("full", dense_model, _flipped_pair),
    "multicrop": Protocol("multicrop", lambda model: model, lambda x: x),
}


def protocol_parts(name: str) -> list[str]:
    """The PROTOCOLS rows of a protocol name ("dense+multicrop": ["dense", "multicrop"])."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in PROTOCOLS]
    if unknown:
        raise KeyError(f"unknown protocol {name!r}; valid: {sorted(PROTOCOLS)}, or several joined by '+'")
    return parts


def posterior_fn(model, protocol: str, *, max_pixels: int | None = None, shards: int = 1):
    """A jitted fn(variables, images) -> float32[B, classes] softmax posteriors of one view batch.

    images: float32[B, S, S, 3] ("center"), float32[B, Q, Q, 3] ("dense"; the mean with its flip) or
    float32[B, V, S, S, 3] ("multicrop"; the mean over V crops).
    max_pixels: at most this many input pixels per device go through the network at once: the views
      are run in a loop of chunks (`_mean_over_views`), same posteriors up to rounding. None: all
      views of the batch in one call.
    shards: the devices the batch axis is split over (each holds B / shards images).
    """
    import jax
    import jax.numpy as jnp

    if protocol not in PROTOCOLS:
        raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(PROTOCOLS)}")
    row = PROTOCOLS[protocol]
    net = row.net(model)

    def probs(variables, x):
        return jax.nn.softmax(net.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

    return jax.jit(lambda v, x: _mean_over_views(functools.partial(probs, v), row.arrange(x),
                                                 max_pixels=max_pixels, shards=shards))


def _chunk_plan(images: int, views: int, view_pixels: int, max_pixels: int | None) -> tuple[int, int]:
    """(images, views per image) of one chunk on one device, within max_pixels.

    Images per chunk divide the device's images (the batch axis is sharded); the views per image are
    balanced over the fewest chunks (the last chunk of an image may overlap the one before).
    """
    if max_pixels is None or images * views * view_pixels <= max_pixels:
        return images, views
    budget = max(1, max_pixels // view_pixels)
    per_chunk = max(d for d in range(1, min(images, budget) + 1) if images % d == 0)
    steps = -(-views // max(1, budget // per_chunk))
    return per_chunk, -(-views // steps)


def _mean_over_views(f, x, *, max_pixels: int | None, shards: int):
    """The mean over axis 1 of f over the views x: float32[B, V, h, w, 3] -> float32[B, classes].

    f maps float32[n, h, w, 3] to float32[n, classes]. In chunks, a loop in the program so that XLA
    allocates one chunk's activations: chunk (k, j) holds images k, k + nb, ... (a strided slice, so
    each device keeps its own rows) and their j-th run of views, sliced in place (no copy of x).
    """
    import jax
    import jax.numpy as jnp

    b, v, h, w, c = x.shape
    images, per_view = _chunk_plan(b // shards, v, h * w, max_pixels)
    if (images, per_view) == (b // shards, v):
        return f(x.reshape(b * v, h, w, c)).reshape(b, v, -1).mean(1)
    nv = -(-v // per_view)
    m, nb = shards * images, b // (shards * images)
    xs = x.reshape(m, nb, v, h, w, c)
    classes = jax.eval_shape(f, jax.ShapeDtypeStruct((m * per_view, h, w, c), x.dtype)).shape[-1]

    def chunk(i, out):
        k, start = i // nv, jnp.minimum(i % nv * per_view, v - per_view)
        views = jax.lax.dynamic_slice(xs, (0, k, start, 0, 0, 0), (m, 1, per_view, h, w, c))
        probs = f(views.reshape(m * per_view, h, w, c)).reshape(m, 1, per_view, classes)
        return jax.lax.dynamic_update_slice(out, probs, (0, k, start, 0))

    out = jax.lax.fori_loop(0, nb * nv, chunk, jnp.zeros((m, nb, v, classes), jnp.float32))
    return out.reshape(b, v, classes).mean(1)


class Evaluator:
    """Posteriors of one model under the protocols: batches sharded over a mesh, memory bounded.

    Built once per model (training builds one in `setup`, `evaluate` one per call): the jitted
    program of each protocol is built once and reused for every scale and every evaluation.

    Args:
      model: a VGG module.
      image_size: the crop size S (center and multi-crop views; the unit of max_views).
      mesh: the "data" mesh (default: all devices, `parallel.create_mesh`).
      max_views: image_size x image_size views per device per network call (a Q x Q dense view
        counts as (Q / S)**2 of them): "auto" for `views_per_call` (the memory budget), None for
        no limit (a whole batch of views in one call).
      datasets: `create_dataset` as vgg_flax.data.pipeline's (default: that module).
    """

    def __init__(self, model, *, image_size: int, mesh=None, max_views: int | str | None = "auto",
                 datasets: Any = None):
        if max_views == "auto":
            max_views = views_per_call(model, image_size)
        elif max_views is not None and max_views < 1:
            raise ValueError(f"max_views must be at least 1 (or None for no limit), not {max_views}")
        self.model, self.image_size, self.max_views = model, image_size, max_views
        self.mesh = parallel.create_mesh() if mesh is None else mesh
        self.datasets = datasets
        self._programs: dict[tuple[str, bool], Callable] = {}

    def program(self, protocol: str, whole: bool = False) -> Callable:
        """The jitted fn(variables, images) -> float32[B, classes] posteriors of one protocol
        (`posterior_fn`), built once; whole: one whole image per call on one device."""
        if (protocol, whole) not in self._programs:
            max_pixels = None if self.max_views is None else self.max_views * self.image_size**2
            self._programs[protocol, whole] = posterior_fn(
                self.model, protocol, max_pixels=max_pixels, shards=1 if whole else self.mesh.size)
        return self._programs[protocol, whole]

    def posteriors(self, variables, name: str, split: str, *, protocol: str, batch_size: int,
                   scale: int | None = None, dense_images: str = "square", **data):
        """This process's (float32[n, classes] posteriors, int32[n] labels) of one protocol at scale Q.

        Rows follow the split's fixed evaluation order; padding is removed, so n is this process's
        exact share of the split. batch_size: images per batch of this process. scale: Q (None:
        the pipeline's default). dense_images="whole" evaluates one whole image per call on one
        device (see the module docstring). data: more `create_dataset` arguments (data_dir,
        normalization, multicrop_grid, process_index, process_count).
        """
        if dense_images not in ("square", "whole"):
            raise KeyError(f"dense_images must be 'square' or 'whole', not {dense_images!r}")
        if protocol not in PROTOCOLS:
            raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(PROTOCOLS)}")
        whole = protocol == "dense" and dense_images == "whole"
        view, batch_size = ("whole", 1) if whole else (PROTOCOLS[protocol].views, batch_size)
        fn, device = self.program(protocol, whole), jax.local_devices()[0]
        if not whole:
            parallel.check_batch_divides(global_batch_size=batch_size * jax.process_count(),
                                         num_devices=self.mesh.size, num_processes=jax.process_count())
        variables = jax.device_put(variables, device if whole else parallel.replicated(self.mesh))
        batches = self._datasets().create_dataset(
            name, split, batch_size=batch_size, train=False, image_size=self.image_size, eval_views=view,
            eval_resize=scale, **data)
        probs, labels = [], []
        for batch in batches:
            if whole:
                out = np.asarray(fn(variables, batch["image"]))
            else:
                out = parallel.local_rows(fn(variables, parallel.global_array(batch["image"], self.mesh)),
                                          self.mesh)
            probs.append(out[batch["mask"]])
            labels.append(batch["label"][batch["mask"]])
        return np.concatenate(probs), np.concatenate(labels)

    def _datasets(self):
        if self.datasets is None:
            from vgg_flax.data import pipeline

            return pipeline
        return self.datasets


def posteriors(model, variables, name: str, split: str, *, protocol: str, scale: int, image_size: int,
               batch_size: int, max_views: int | str | None = "auto", **kwargs):
    """`Evaluator(model, image_size=..., max_views=...).posteriors(variables, ...)`, for one call."""
    evaluator = Evaluator(model, image_size=image_size, max_views=max_views)
    return evaluator.posteriors(variables, name, split, protocol=protocol, scale=scale,
                                batch_size=batch_size, **kwargs)


def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows rank their label among the k highest posteriors (`vgg_flax.evaluation.topk`'s tie rule:
    the lower index first)."""
    return int(np.sum(topk_hits(probs, labels, k)))


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """{"top1", "top5", "loss", "count"}: sums over this process, summed over all processes, divided
    once. loss: the mean negative log posterior of the label (for "center", the cross-entropy)."""
    picked = np.take_along_axis(probs, labels[:, None].astype(np.int64), axis=1)[:, 0]
    nll = -np.log(np.maximum(picked.astype(np.float64), np.finfo(np.float32).tiny))
    counts = parallel.sum_over_processes(np.asarray(
        [topk_correct(probs, labels, 1), topk_correct(probs, labels, 5), len(labels)], np.int64))
    # (a float sum gathered over processes is float32: exact for the counts above, not for this)
    loss = float(parallel.sum_over_processes(np.asarray([nll.sum()]))[0])
    count = int(counts[2])
    return {"top1": float(counts[0] / max(count, 1)), "top5": float(counts[1] / max(count, 1)),
            "loss": loss / max(count, 1), "count": count}


def evaluate(model, variables, name: str, split: str, *, image_size: int = 224,
             protocols: Sequence[str] = ("center",), scales: Sequence[int] | None = None,
             batch_size: int = 32, data_dir: str | None = None, normalization: str = "torchvision",
             multicrop_grid: int = 5, dense_images: str = "square",
             max_views: int | str | None = "auto", process_index: int | None = None,
             process_count: int | None = None) -> dict[str, dict[str, Any]]:
    """Top-1/top-5 of each protocol over a split (or "folder:/root" split).

    Args:
      model, variables: a VGG module and its {"params"[, "batch_stats"]}.
      name, split, data_dir: as `vgg_flax.data.pipeline.create_dataset`.
      image_size: the crop size S (center and multi-crop views).
      protocols: names of PROTOCOLS, or several joined by "+" (their posteriors averaged).
      scales: test scales Q; posteriors are averaged over them. Default: the pipeline's single
        default Q (round(S * 256 / 224), or S for fixed-size datasets such as the digits).
      batch_size: images per batch of the input pipeline (multi-crop: times 2 * grid**2 crops).
      dense_images: "square" (batched) or "whole" (the paper's; one image per call).
      max_views: image_size x image_size views per device per network call: "auto" (the memory
        budget, `views_per_call`), a number, or None (a whole batch of views at once); see `Evaluator`.
    Returns:
      {protocol: {"top1", "top5" (fractions), "loss" (mean -log posterior of the label), "count"
      (examples), "scales" (list)}}.
    """
    from vgg_flax.data import pipeline as input_pipeline

    parts = {p: protocol_parts(p) for p in protocols}
    if not scales:
        info = input_pipeline.dataset_info(name, data_dir=data_dir)
        from vgg_flax.preprocessing import get_preset

        scales = [input_pipeline.default_eval_resize(image_size, info.image_shape is not None,
                                                     get_preset(normalization))]
    needed = sorted({part for p in parts.values() for part in p})
    evaluator = Evaluator(model, image_size=image_size, max_views=max_views)
    kw = dict(batch_size=batch_size, data_dir=data_dir, normalization=normalization,
              multicrop_grid=multicrop_grid, dense_images=dense_images, process_index=process_index,
              process_count=process_count)
    averaged, labels = {}, None
    for protocol in needed:
        per_scale = [evaluator.posteriors(variables, name, split, protocol=protocol, scale=q, **kw)
                     for q in scales]
        averaged[protocol] = np.mean([p for p, _ in per_scale], axis=0)
        labels = per_scale[0][1]
    results = {}
    for protocol in protocols:
        probs = np.mean([averaged[part] for part in parts[protocol]], axis=0)
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
