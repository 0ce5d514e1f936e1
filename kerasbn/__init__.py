"""kerasbn: batch normalization for Keras 3, and the tools to fold it away.

- `kerasbn.layers`: BatchNormalization (zero-debiased statistics),
  BatchRenormalization (with its schedule), MovingAverageBatchNormalization
  (MABN) and weight-centred convolutions, ScaleShift.
- `kerasbn.fold(model)`: fold every foldable BN into its neighbours
  (`kerasbn.folding` holds the machinery).
- `kerasbn.export(model, directory)`: fold, export to SavedModel / ONNX /
  Keras / TFLite, verify each artifact in its own runtime
  (`kerasbn.exporting`).
- `kerasbn.fold_saved_model(path, directory)`: the same from a SavedModel
  directory or frozen GraphDef, without the Keras code (graph-level fold).
- `kerasbn.recalibrate`, `freeze`, `unfreeze`, `diagnose`,
  `load_tf1_batch_norm`: statistics tools (`kerasbn.stats`).
- `kerasbn.quantization_report(model, data)`, `kerasbn.equalize(model)`:
  int8 numerics per folded layer, cross-layer equalization
  (`kerasbn.quantization`).
- `kerasbn.convert_to_mabn(model)`: BN model -> MABN + centred convolutions.
- `kerasbn.registry`: what every tool knows about layers; one
  `register_normalization` call teaches all of them a new kind.

>>> import kerasbn
>>> layer = kerasbn.layers.BatchNormalization(zero_debias="mean")
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it. Each loads on first access
# (PEP 562): `import kerasbn` alone costs nothing, so `kerasbn-fold`
# (module kerasbn.cli, whose import runs this file first) checks its
# arguments before TensorFlow loads (~5 s).
_LAZY = {
    "ConversionResult": "kerasbn.convert",
    "ExportError": "kerasbn.exporting",
    "ExportResult": "kerasbn.exporting",
    "FoldResult": "kerasbn.folding",
    "VerificationError": "kerasbn.exporting",
    "convert_to_mabn": "kerasbn.convert",
    "diagnose": "kerasbn.stats",
    "equalize": "kerasbn.quantization",
    "export": "kerasbn.exporting",
    "fold": "kerasbn.folding",
    "fold_saved_model": "kerasbn.exporting",
    "freeze": "kerasbn.stats",
    "layers": "kerasbn.layers",
    "load_tf1_batch_norm": "kerasbn.stats",
    "quantization": "kerasbn.quantization",
    "quantization_report": "kerasbn.quantization",
    "recalibrate": "kerasbn.stats",
    "register_linear": "kerasbn.registry",
    "register_normalization": "kerasbn.registry",
    "registry": "kerasbn.registry",
    "rules": "kerasbn.rules",
    "stats": "kerasbn.stats",
    "strip_normalization": "kerasbn.folding",
    "unfreeze": "kerasbn.stats",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kerasbn' has no attribute {name!r}")
    importlib.import_module("kerasbn.layers")  # registers kerasbn's layers
    module = importlib.import_module(module_name)
    value = module if module_name == f"kerasbn.{name}" else getattr(
        module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# `import kerasbn` has always registered kerasbn's layers with Keras, so
# that `keras.models.load_model` finds them in a .keras file. Keras loaded
# already: register now (it costs nothing more). Not yet: register the
# moment it loads, whatever imports it, by wrapping its loader once.


class _ThenRegister(importlib.abc.Loader):
    """Keras' own loader, then `import kerasbn.layers`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        importlib.import_module("kerasbn.layers")

    def __getattr__(self, name):  # get_resource_reader and the like
        return getattr(self._loader, name)


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # One shot; find the real spec below.
        spec = importlib.util.find_spec("keras")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


if "keras" in sys.modules:
    importlib.import_module("kerasbn.layers")
elif not any(isinstance(f, _RegisterWhenKerasLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())
