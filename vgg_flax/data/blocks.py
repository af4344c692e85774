"""Block-shuffled reading of a TFRecord split, so that a resumed run never replays an epoch.

A process's share of the split is cut into blocks of at most K consecutive records. Epoch e visits
the blocks in an order drawn from (key, e) and shuffles each block (buffer K) with a seed from
(key, e, block), so the order is a pure function of (key, epoch, position). A stream started at
position p reads nothing before the block that holds p and skips at most K records inside it, where
one shuffle buffer over the whole stream would have to replay everything since the epoch began.

TFDS writes records in a hashed (class-mixed) order, so a block is a fair sample of the split and the
block order adds mixing across epochs. Imported by `vgg_flax.data.pipeline` (it imports TensorFlow).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Pieces (file, skip, take) of consecutive records, grouped into blocks of <= block records.

    Attributes:
      files, skips, takes: str/int64[P], one row per piece (a piece lies within one file).
      first_piece, num_pieces, sizes: int64[B], each block's pieces and its record count.
    """

    files: np.ndarray
    skips: np.ndarray
    takes: np.ndarray
    first_piece: np.ndarray
    num_pieces: np.ndarray
    sizes: np.ndarray


def cut_blocks(instructions: list[tuple[str, int, int]], block: int) -> Blocks:
    """Blocks of at most `block` records from (file, skip, take) instructions in reading order."""
    pieces, firsts, counts, sizes = [], [], [], []
    size = 0
    for file_name, skip, take in instructions:
        while take > 0:
            if size == 0:
                firsts.append(len(pieces))
                counts.append(0)
                sizes.append(0)
            piece = min(take, block - size)
            pieces.append((file_name, skip, piece))
            counts[-1] += 1
            sizes[-1] += piece
            size = (size + piece) % block
            skip, take = skip + piece, take - piece
    files, skips, takes = zip(*pieces, strict=True) if pieces else ((), (), ())
    as64 = lambda v: np.asarray(v, np.int64)
    return Blocks(np.asarray(files, dtype=str), as64(skips), as64(takes), as64(firsts), as64(counts),
                  as64(sizes))


def block_order(key: int, epoch, num_blocks: int) -> tf.Tensor:
    """int32[num_blocks]: the permutation of blocks in `epoch` (stateless: the same eagerly and in
    tf.data)."""
    seed = tf.stack([tf.constant(key, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([num_blocks], seed=seed))


def record_stream(blocks: Blocks, *, key: int, block: int, first: int) -> tf.data.Dataset:
    """Serialized records of the infinite block-shuffled stream, from stream position `first`."""
    n = int(blocks.sizes.sum())
    pieces = tf.data.Dataset.from_tensor_slices((blocks.files, blocks.skips, blocks.takes))
    firsts, counts = tf.constant(blocks.first_piece), tf.constant(blocks.num_pieces)
    num_blocks = len(blocks.sizes)

    def block_records(epoch, b):
        rows = pieces.skip(firsts[b]).take(counts[b])
        records = rows.flat_map(lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t))
        seed = tf.constant(key, tf.int64) + tf.cast(epoch, tf.int64) * 104_729 + tf.cast(b, tf.int64) * 7_919
        return records.shuffle(block, seed=seed, reshuffle_each_iteration=False)

    def epoch_records(epoch, start_block=0):
        order = tf.data.Dataset.from_tensor_slices(block_order(key, epoch, num_blocks)[start_block:])
        return order.flat_map(lambda b: block_records(epoch, b))

    epoch0, offset = divmod(first, n)
    cumulative = np.cumsum(blocks.sizes[block_order(key, epoch0, num_blocks).numpy()])
    start_block = int(np.searchsorted(cumulative, offset, side="right"))
    within = offset - (int(cumulative[start_block - 1]) if start_block else 0)
    head = epoch_records(epoch0, start_block).skip(within)
    return head.concatenate(tf.data.Dataset.range(epoch0 + 1, 2**62).flat_map(epoch_records))
