"""Datasets as random-access sources (synthetic, IDX images, tfds) and deterministic batching."""
from mtl.data.base import ArraySource, DataBundle, SubsetSource, TaskInfo
from mtl.data.pipeline import TrainBatches, eval_batches, split_validation
from mtl.data.registry import DATASETS, load_dataset
