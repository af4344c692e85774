r"""The paper's net B (VGG13) on ImageNet-1k, with configs/imagenet_vgg16.py's recipe.

    python train.py --config configs/vgg13.py --workdir /ckpt/vgg13 --config.data.data_dir=/data/tfds

The paper warm-started the deeper nets from a trained A: add
--config.warm_start_from=/ckpt/vgg11 (its first four convs and three FC layers are copied).
"""

from vgg_flax.configs import imagenet_vgg16


def get_config():
    return imagenet_vgg16.get_config("B")
