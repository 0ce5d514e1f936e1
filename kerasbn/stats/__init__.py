"""Tools for the statistics of normalization layers.

- `recalibrate`: exact population statistics over a dataset;
- `freeze` / `unfreeze`: inference-mode normalization for fine-tuning;
- `diagnose`: a report of what is wrong with a model's statistics;
- `load_tf1_batch_norm`: TF1 `batch_norm` checkpoints into Keras layers.

Every tool sees a layer through its kind in `kerasbn.registry` (what it
stores and how to write it); Keras' BatchNormalization (and every subclass,
kerasbn's included) and MABN are known, and
`kerasbn.register_normalization(cls, statistics=...)` adds a layer class.

>>> import keras, kerasbn
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization()])
>>> [layer.trainable for layer in kerasbn.stats.freeze(model).layers]
[False]
"""

from kerasbn.registry import Averages
from kerasbn.registry import StatisticsKind
from kerasbn.registry import register_statistics_kind
from kerasbn.stats.diagnose import Diagnosis
from kerasbn.stats.diagnose import Finding
from kerasbn.stats.diagnose import LayerDiagnosis
from kerasbn.stats.diagnose import diagnose
from kerasbn.stats.freeze import FrozenNormalizations
from kerasbn.stats.freeze import freeze
from kerasbn.stats.freeze import unfreeze
from kerasbn.stats.recalibrate import recalibrate
from kerasbn.stats.tf1 import load_tf1_batch_norm

__all__ = [
    "Averages",
    "Diagnosis",
    "Finding",
    "FrozenNormalizations",
    "LayerDiagnosis",
    "StatisticsKind",
    "diagnose",
    "freeze",
    "load_tf1_batch_norm",
    "recalibrate",
    "register_statistics_kind",
    "unfreeze",
]
