r"""The default run: a small BatchNorm VGG on the embedded digits (32x32), minutes on 2 CPU cores.

    python train.py --workdir /tmp/vgg_digits            # no --config: this file
    python train.py --config configs/default.py --workdir DIR --config.num_train_steps=100

Every other config starts from `get_config()` here and overrides what differs, so this file lists
every key the training program reads (the ConfigDict is locked: a misspelled key is an error).
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """The `model` section: fields of `vgg_flax.VGG` (see its docstring)."""
    m = ml_collections.ConfigDict()
    # A paper name ("A", "A-LRN", "B", "C", "D", "E", or "vgg16"...) or a comma list of widths,
    # "M" (2x2 max-pool), "LRN" and "WIDTHxK" (a KxK conv), e.g. --config.model.config=32,M,64,M.
    # Four narrow blocks: the last conv sees the whole 32x32 digit before the global-average-pool
    # head (with three, the 4x4 map's features see too little and accuracy stalls near 75%), and a
    # training step costs ~25 MFLOP per image, so the run takes about a minute on 2 CPU cores.
    m.config = "16,M,32,M,64,M,128,M"
    m.batch_norm = True
    m.head = "small"              # torchvision | dense | none | small
    m.dropout_rate = 0.2
    m.fc_width = 4096             # the torchvision/dense heads' FC width
    m.small_head_width = 64       # the small head's hidden layer (0: linear)
    m.weight_init = "torchvision"  # or "paper": N(0, 0.01) everywhere
    return m


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data (vgg_flax.input_pipeline.create_dataset).
    c.dataset = "sklearn_digits"  # embedded, built locally: no download
    c.data_dir = ""               # "" = TFDS's default
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 32
    c.augment = "shift"           # paper | inception | shift | flip | none
    c.normalization = "symmetric"  # a vgg_flax.preprocessing preset
    c.scale_range = (0, 0)        # augment="paper": short side S jittered in [min, max]; (0, 0) = fixed
    c.num_classes = 0             # 0 = the dataset's

    c.model = model_config()
    c.dtype = "float32"           # compute dtype: float32 | bfloat16 | float16 (params stay float32)
    c.remat = False               # rematerialise each conv block in the backward pass (less memory)

    # Batches and steps. The global batch is split over all devices of all processes.
    c.global_batch_size = 32
    c.eval_batch_size = 128
    c.grad_accum_steps = 1        # micro-batches per step (same global batch, less memory)
    c.num_train_steps = 500
    c.eval_every_steps = 250
    c.log_every_steps = 50
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 3        # the latest K, plus the best by eval_top1
    c.async_checkpoints = True

    # Optimizer (vgg_flax.optim): sgd (momentum, the paper's) or adamw.
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4         # on kernels; SGD: as the paper's L2 penalty
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.grad_clip_norm = 0.0

    # Schedule: constant | plateau (the paper's: x lr_factor when eval top-1 stalls) | step | cosine.
    c.schedule = "cosine"
    c.warmup_steps = 25
    c.lr_boundaries = ()          # "step": the steps where lr *= lr_factor
    c.lr_factor = 0.1
    c.cosine_end_fraction = 0.0
    c.plateau_patience = 2        # evaluations without improvement before dividing
    c.plateau_min_delta = 0.0
    c.plateau_max_reductions = 3

    # Starting weights.
    c.warm_start_from = ""        # a net A workdir: the paper's warm start of deeper nets
    c.pretrained = ""             # weights to fine-tune: a name (vgg16), URL or file (from_pretrained)
    c.reset_head = False          # new classifier for a new class count
    c.freeze_features = False     # train the head only

    c.seed = 0
    c.tensorboard = True
    c.progress = "auto"           # auto | bar | lines | none
    c.lock()
    return c
