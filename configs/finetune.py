r"""Fine-tuning converted torchvision weights on a new dataset: new classifier, optional frozen features.

    vgg-flax convert vgg16-397923af.pth /weights/vgg16.safetensors        # once (see README)
    python train.py --config configs/finetune.py --workdir /tmp/vgg16_flowers \
        --config.pretrained=/weights/vgg16.safetensors --config.data.dataset=tf_flowers

Every layer shared with the weights is copied; the classifier (fc3) is re-initialised for the
dataset's class count (`reset_head`), and with `optim.freeze_features` only the FC layers train (conv and
BatchNorm parameters get zero updates; BatchNorm running statistics still follow the new data).
Input preprocessing must match the weights: torchvision's (224 crops of a 256 short side, ImageNet
mean/std).
"""

from vgg_flax.configs import default


def get_config():
    c = default.get_config()
    c.data.dataset = "tf_flowers"  # any TFDS image dataset (or folder:/path)
    c.data.train_split = "train[:90%]"
    c.data.eval_split = "train[90%:]"
    c.data.image_size = 224
    c.data.augment = "inception"
    c.data.normalization = "torchvision"
    c.pretrained = None           # required: a name (vgg16, see `vgg-flax weights list`), URL or file
    c.reset_head = True
    c.optim.freeze_features = True
    c.model.config = "D"          # must match the weights (vgg16); "E" for vgg19 ...
    c.model.batch_norm = False
    c.model.head = "torchvision"
    c.model.dropout_rate = 0.5
    c.global_batch_size = 64
    c.eval.batch_size = 64
    c.num_train_steps = 2000
    c.eval.every_steps = 500
    c.checkpoints.every_steps = 500
    c.optim.name = "sgd"
    c.optim.weight_decay = 1e-4
    c.schedule.name = "cosine"
    c.schedule.learning_rate = 1e-3
    c.schedule.warmup_steps = 100
    return c
