r"""The default run: a small BatchNorm VGG on the embedded digits (32x32), minutes on 2 CPU cores.

    python train.py --workdir /tmp/vgg_digits            # no --config: this file
    python train.py --config configs/default.py --workdir DIR --config.num_train_steps=100

Every other config starts from `get_config()` here and overrides what differs, so this file lists
every key the training program reads (the ConfigDict is locked: a misspelled key is an error).

A few run-wide keys sit at the top level (seed, num_train_steps, global_batch_size and the starting
weights: warm_start_from, pretrained, reset_head); everything else is in a section, and each section
is the keyword arguments of the one function that uses it (and checks it), and an unset value is
None (`placeholder(type)`, which --config.KEY=VALUE still sets with its type):

    data         vgg_flax.train.loop.make_data (dataset, splits, crops, augmentation, preset)
    model        fields of vgg_flax.VGG (vgg_flax.VGG.from_config)
    step         vgg_flax.train.steps.train_step (gradient accumulation, rematerialisation)
    optim        vgg_flax.train.optim.make_optimizer (sgd | adamw, decay, clipping, frozen features)
    schedule     vgg_flax.train.optim.make_schedule (the learning rate and the plateau rule)
    eval         vgg_flax.train.loop.EvalSpec (how often, batch size)
    checkpoints  vgg_flax.train.checkpoints.Checkpoints (how often, how many kept, async)
    log          vgg_flax.train.loop.LogSpec (metrics row cadence, TensorBoard, console)

Override any key on the command line: --config.num_train_steps=100, --config.data.dataset=tf_flowers,
--config.schedule.learning_rate=0.1, --config.model.config=32,M,64,M.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def data_config() -> ml_collections.ConfigDict:
    """The `data` section (vgg_flax.data.pipeline.create_dataset's options)."""
    d = ml_collections.ConfigDict()
    d.dataset = "sklearn_digits"  # embedded, built locally: no download
    d.data_dir = placeholder(str)  # None = TFDS's default
    d.train_split = "train"
    d.eval_split = "test"
    d.image_size = 32
    d.augment = "shift"           # paper | inception | shift | flip | none
    d.normalization = "symmetric"  # a vgg_flax.preprocessing preset
    d.scale_range = placeholder(tuple)  # augment="paper": short side S jittered in [min, max]; None = fixed
    d.num_classes = placeholder(int)  # None = the dataset's
    return d


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
    # compute dtype: float32 | bfloat16 | float16 (params stay float32); float16 has no loss
    # scaling, so small gradients underflow (a warning says so): use bfloat16 for half precision.
    m.dtype = "float32"
    return m


def optim_config() -> ml_collections.ConfigDict:
    """The `optim` section: the update direction (vgg_flax.train.optim.make_optimizer)."""
    o = ml_collections.ConfigDict()
    o.name = "sgd"                # sgd (momentum, the paper's) | adamw
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = 5e-4         # on kernels; SGD: as the paper's L2 penalty
    o.b1 = 0.9                    # adamw
    o.b2 = 0.999
    o.eps = 1e-8
    o.grad_clip_norm = 0.0        # clip the global gradient norm first; 0 = off
    o.freeze_features = False     # train the head only (zero updates for conv/BatchNorm parameters)
    return o


def schedule_config() -> ml_collections.ConfigDict:
    """The `schedule` section: the learning rate (vgg_flax.train.optim.make_schedule)."""
    s = ml_collections.ConfigDict()
    # constant | plateau (the paper's: x factor when eval top-1 stalls) | step | cosine
    s.name = "cosine"
    s.learning_rate = 0.05        # the base (peak) rate
    s.warmup_steps = 25
    s.boundaries = ()             # "step": the steps where lr *= factor
    s.factor = 0.1                # "step" and "plateau"
    s.end_fraction = 0.0          # "cosine": final rate / base rate
    s.patience = 2                # "plateau": evaluations without improvement before dividing
    s.min_delta = 0.0             # "plateau": top-1 improvement (fraction) that counts
    s.max_reductions = 3          # "plateau": the paper divided 3 times
    return s


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 500
    c.global_batch_size = 32      # split over all devices of all processes
    # Starting weights (at most one of the two paths).
    c.warm_start_from = placeholder(str)  # a net A workdir: the paper's warm start of deeper nets
    c.pretrained = placeholder(str)  # weights to fine-tune: a name (vgg16), URL or file (from_pretrained)
    c.reset_head = False          # new classifier for a new class count

    c.data = data_config()
    c.model = model_config()
    c.step = ml_collections.ConfigDict({
        "grad_accum_steps": 1,    # micro-batches per step (same global batch, less memory)
        "remat": False,           # rematerialise each conv block in the backward pass (less memory)
    })
    c.optim = optim_config()
    c.schedule = schedule_config()
    c.eval = ml_collections.ConfigDict({"every_steps": 250, "batch_size": 128})
    c.checkpoints = ml_collections.ConfigDict({
        "every_steps": 250,
        "keep": 3,                # the latest K, plus the best by eval_top1
        "async_save": True,
    })
    c.log = ml_collections.ConfigDict({
        "every_steps": 50,
        "tensorboard": True,
        "progress": "auto",       # auto | bar | lines | none
    })
    c.lock()
    return c
