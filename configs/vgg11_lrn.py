r"""The paper's net A-LRN (VGG11 with AlexNet's LRN after conv1_1); the paper found LRN does not help,
on ImageNet-1k with configs/imagenet_vgg16.py's recipe.

    python train.py --config configs/vgg11_lrn.py --workdir /ckpt/vgg11_lrn --config.data.data_dir=/data/tfds
"""

from vgg_flax.configs import imagenet_vgg16


def get_config():
    return imagenet_vgg16.get_config("A-LRN")
