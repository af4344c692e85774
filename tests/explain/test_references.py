"""Attribution maps equal to the references on torchvision's VGG16 (random weights, BN variant too).

pytorch-grad-cam 1.5 (`GradCAM`, `GradCAMPlusPlus`, target layer = the torchvision module of the same
tap) and captum 0.9 (`Saliency`, `IntegratedGradients`, the same steps and rule), at 64x64 (the
adaptive pool enlarges the 2x2 map to 7x7). fp32, errors relative to the largest magnitude.

Input gradients go through the max-pools: where a window's two largest values are within rounding,
two implementations can send the gradient to different cells. The XLA conv path rounds as
torchvision does, so the input-gradient comparisons (saliency, IG) run on it; the CPU Winograd path
is held to a bound on the fraction of pixels that differ (docs/research.md).
"""

import numpy as np
import pytest

import vgg_flax
from vgg_flax import explain

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torch_reference import randomize_bn  # noqa: E402  (needs torch)

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum")

REL_TOL = 1e-4
SIZE = 64



def _tap_modules(features):
    """{our tap name: torchvision module} for relu{b}_{k} / conv{b}_{k} / pool{b} in `features`."""
    out, block, conv = {}, 1, 0
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            conv += 1
            out[f"conv{block}_{conv}"] = module
        elif isinstance(module, torch.nn.ReLU):
            out[f"relu{block}_{conv}"] = module
        elif isinstance(module, torch.nn.MaxPool2d):
            out[f"pool{block}"] = module
            block, conv = block + 1, 0
    return out


@pytest.fixture(scope="module", params=["vgg16", "vgg16_bn"])
def pair(request):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, request.param)().eval()
    if request.param.endswith("_bn"):
        reference = randomize_bn(reference, seed=1)
    model, variables = vgg_flax.load_torchvision(reference.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    return request.param, reference, model, variables, x


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _rel_err(got, expected):
    return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _targets(reference, x):
    """The top-1 of image 0 and the bottom-1 of image 1 (a class the image does not support)."""
    with torch.no_grad():
        logits = reference(x)
    return [int(logits[0].argmax()), int(logits[1].argmin())]


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_plus_plus"])
def test_cams_equal_pytorch_grad_cam_raw_and_upsampled(pair, method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name, reference, model, variables, x = pair
    tap = "relu5_3" if name == "vgg16" else "relu4_3"
    layer = _tap_modules(reference.features)[tap]
    targets = _targets(reference, x)
    cls = GradCAM if method == "grad_cam" else GradCAMPlusPlus
    with cls(model=reference, target_layers=[layer]) as cam:
        upsampled = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(x, layer, None, acts, grads), 0)  # before any scaling
    fn = getattr(explain, method)
    xla = model.clone(conv_impl="xla")
    got_raw = fn(xla, variables, _nhwc(x), targets, tap=tap, upsample=False)
    assert got_raw.shape == raw.shape and _rel_err(got_raw, raw) <= REL_TOL
    if (name == "vgg16") == (method == "grad_cam"):  # each method and variant once, to save compiles
        got = fn(xla, variables, _nhwc(x), targets, tap=tap)
        assert got.shape == (2, SIZE, SIZE) and _rel_err(got, upsampled) <= REL_TOL
    if name == "vgg16" and method == "grad_cam":
        # The CPU conv path: the channel weights average the gradient over the map, so a max-pool
        # tie routed to another cell of the same map cannot move them.
        got_cpu = fn(model.clone(conv_impl="cpu"), variables, _nhwc(x), targets, tap=tap, upsample=False)
        assert _rel_err(got_cpu, raw) <= REL_TOL


def test_saliency_equals_captum(pair):
    from captum.attr import Saliency

    name, reference, model, variables, x = pair
    targets = _targets(reference, x)
    expected = Saliency(reference).attribute(x.clone().requires_grad_(), target=targets, abs=True)
    expected = _nhwc(expected)
    got = explain.saliency(model.clone(conv_impl="xla"), variables, _nhwc(x), targets, per_channel=True)
    assert _rel_err(got, expected) <= REL_TOL
    if name == "vgg16":  # the map (max over channels) on the CPU conv path, max-pool ties bounded
        cpu = np.asarray(explain.saliency(model.clone(conv_impl="cpu"), variables, _nhwc(x), targets))
        expected = expected.max(axis=-1)
        differ = np.abs(cpu - expected) > REL_TOL * np.abs(expected).max()
        assert cpu.shape == (2, SIZE, SIZE) and differ.mean() <= 0.05


def test_integration_rules_are_captums():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for rule, ours in explain.IG_RULES.items():
        sizes, alphas = approximation_parameters(rule)
        for n in (2, 7, 32):
            a, w = ours(n)
            np.testing.assert_allclose(a, alphas(n), rtol=1e-6, atol=1e-7, err_msg=rule)
            np.testing.assert_allclose(w, sizes(n), rtol=1e-6, atol=1e-9, err_msg=rule)


@pytest.mark.parametrize("pair", ["vgg16"], indirect=True)  # BN's input gradients: saliency's test
def test_integrated_gradients_equal_captum(pair):
    from captum.attr import IntegratedGradients

    _, reference, model, variables, x = pair
    targets = _targets(reference, x)
    baseline = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    expected = _nhwc(IntegratedGradients(reference).attribute(
        x, baselines=baseline, target=targets, n_steps=8, method="gausslegendre"))
    got = np.asarray(explain.integrated_gradients(
        model.clone(conv_impl="xla"), variables, _nhwc(x), targets, baseline=_nhwc(baseline),
        steps=8, per_channel=True))
    # 16 path images: a max-pool window of one of them ties within rounding (measured: pool3, a
    # relative gap of 2e-7), which moves 1.8% of the attributions by up to 5e-3. A wrong rule,
    # baseline or scaling moves nearly all of them.
    err = np.abs(got - expected) / np.abs(expected).max()
    assert (err > REL_TOL).mean() <= 0.05 and err.max() <= 2e-2
    assert np.median(err) <= 1e-6
