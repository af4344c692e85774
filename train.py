r"""Trains a VGG: `python train.py --workdir DIR [--config configs/NAME.py] [--config.KEY=VALUE ...]`.

With no --config it trains configs/default.py (the embedded digits, minutes on 2 CPU cores). The
flags and the program are in vgg_flax/cli/train_app.py, shared with `vgg-flax train`; see
`python train.py --helpfull` and the README's Training section.
"""

from vgg_flax.cli import train_app

if __name__ == "__main__":
    train_app.run()
