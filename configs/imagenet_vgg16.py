r"""The paper's recipe for net D (VGG16) on ImageNet-1k (Simonyan & Zisserman, Sec. 3.1).

    python train.py --config configs/imagenet_vgg16.py --workdir /ckpt/vgg16 \
        --config.data.data_dir=/data/tfds [--distributed]

SGD, batch 256, momentum 0.9, weight decay 5e-4 (L2 on the weights), dropout 0.5 on FC1/FC2, learning
rate 1e-2 divided by 10 when the validation top-1 stops improving (the paper did it 3 times and
stopped after 370K iterations = 74 epochs), scale jitter S in [256, 512] with 224 crops, flips and
colour shift (`augment="paper"`), net A's layers for warm start (set `warm_start_from` to a trained
configs/vgg11.py workdir) or He init. Needs a prepared TFDS "imagenet2012".
"""

from vgg_flax.configs import default


def get_config(letter: str = "D"):
    c = default.get_config()
    c.data.dataset = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.augment = "paper"       # short side S, 224 crop, flip, PCA colour shift
    # The paper's multi-scale training for C, D, E: S jittered in [256, 512] (A and B: fixed S).
    c.data.scale_range = (256, 512) if letter in ("C", "D", "E") else (256, 256)
    c.data.normalization = "torchvision"
    c.model.config = letter
    c.model.batch_norm = False
    c.model.head = "torchvision"
    c.model.dropout_rate = 0.5
    # Net A from N(0, 0.01) as in the paper; deeper nets from He (kaiming) init, which trains them
    # from scratch (the paper used A's layers or Glorot init): or set warm_start_from to an A run.
    c.model.weight_init = "paper" if letter in ("A", "A-LRN") else "torchvision"
    c.model.dtype = "bfloat16"     # compute dtype on accelerators; parameters stay float32
    c.global_batch_size = 256
    c.eval.batch_size = 256
    steps_per_epoch = 1_281_167 // 256
    c.num_train_steps = 370_000
    c.eval.every_steps = steps_per_epoch
    c.checkpoints.every_steps = steps_per_epoch // 4
    c.log.every_steps = 100
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.schedule.name = "plateau"
    c.schedule.learning_rate = 1e-2
    c.schedule.warmup_steps = 0
    c.schedule.factor = 0.1
    c.schedule.patience = 2
    c.schedule.max_reductions = 3
    return c
