r"""The paper's net A (VGG11): trained from random init (N(0, 0.01)), then used to warm-start the
deeper nets; on ImageNet-1k with configs/imagenet_vgg16.py's recipe.

    python train.py --config configs/vgg11.py --workdir /ckpt/vgg11 --config.data.data_dir=/data/tfds
"""

from vgg_flax.configs import imagenet_vgg16


def get_config():
    return imagenet_vgg16.get_config("A")
