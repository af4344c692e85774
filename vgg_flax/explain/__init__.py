"""Attribution maps and the VGG authors' visualisations, exact to captum and pytorch-grad-cam.

    import vgg_flax
    model, variables = vgg_flax.from_pretrained("vgg16")
    cam = vgg_flax.explain.grad_cam(model, variables, images, None, tap="relu5_3")   # float32[N, H, W]
    ig = vgg_flax.explain.integrated_gradients(model, variables, images, [281, 281], steps=32)

Every method is `(model, variables, images, targets, **options)`: a linen `vgg_flax.VGG` with its
variables or an NNX `vgg_flax.nnx.VGG` with None; images float32[N, H, W, 3] normalised as the
weights expect; targets int[N] or None / "top1". The maps are float32[N, H, W]; `class_model`
returns images. The primitive beneath them, `tap_gradients`, differentiates the class score w.r.t.
any named tap and the input. docs/research.md shows them; the conventions are in each docstring.
"""

from vgg_flax.explain.gradients import Gradients, class_score, tap_gradients
from vgg_flax.explain.maps import (
    IG_RULES,
    grad_cam,
    grad_cam_plus_plus,
    integrated_gradients,
    saliency,
    smooth_grad,
)
from vgg_flax.explain.visualisation import class_model

__all__ = ["IG_RULES", "Gradients", "class_model", "class_score", "grad_cam", "grad_cam_plus_plus",
           "integrated_gradients", "saliency", "smooth_grad", "tap_gradients"]
