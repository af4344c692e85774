"""The training program's configs, one `get_config()` per file; shipped as `vgg_flax.configs`.

`python train.py --config NAME` and `vgg-flax train --config NAME` take a file name here without
`.py` (`default`, `imagenet_vgg16`, `vgg11`, `vgg11_lrn`, `vgg13`, `vgg16`, `vgg16_c`, `vgg19`,
`finetune`) or a path to any config file. This directory stays at the top of the repository;
`vgg_flax/configs` is a symbolic link to it, so the wheel and every checkout see one copy, and
config files import each other as `from vgg_flax.configs import default`.
"""
