"""The consolidation rules of kerasbn's source, enforced.

- No function in `kerasbn/` is longer than 80 lines of code.
- `kerasbn.layers` stands alone: it imports none of the tools
  (`kerasbn.folding`, `kerasbn.exporting`, `kerasbn.stats`) nor the
  registry that describes layers to them.
- Every private Keras/TensorFlow access (`keras.src`, `tensorflow.python`)
  lives in `kerasbn/_keras_internal.py`, which checks the layout it reads
  against the installed Keras and says which versions it was checked with.
- `kerasbn.fold` and `kerasbn.export` are plain functions; the packages
  behind them are plain modules.

Each failure names the offending file, function or version.
"""

import ast
import importlib.util
import inspect
import pathlib
import subprocess
import sys
import types

import keras
import pytest

import kerasbn
from kerasbn import _keras_internal

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kerasbn"
MAX_FUNCTION_LINES = 80
LAYERS_MUST_NOT_IMPORT = ("kerasbn.folding", "kerasbn.exporting",
                          "kerasbn.quantization",
                          "kerasbn.stats", "kerasbn.registry")
PRIVATE_APIS = ("keras.src", "tensorflow.python")
INTERNAL_MODULE = PACKAGE / "_keras_internal.py"


def _sources(directory):
    return sorted(directory.rglob("*.py"))


def _relative(path):
    return path.relative_to(ROOT).as_posix()


def _load_tool(name):
    """`tools/<name>.py` as a module (tools/ is not a package)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_kerasbn_tool_{name}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_is_longer_than_80_lines():
    tool = _load_tool("function_lengths")
    found = tool.long_functions([str(PACKAGE)], MAX_FUNCTION_LINES)
    offenders = [
        f"{_relative(pathlib.Path(path))}:{line}: {name} has {length} lines"
        for path, line, name, length in found
    ]
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} code lines (docstring "
        "excluded): " + "; ".join(offenders))


def test_function_length_tool_finds_a_long_function(tmp_path):
    # The rule above passes vacuously if the tool finds nothing at all.
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "sample.py"
    source.write_text(f'def long():\n    """Doc."""\n{body}\n'
                      f"def short():\n{body[:40]}")
    found = _load_tool("function_lengths").long_functions(
        [str(tmp_path)], MAX_FUNCTION_LINES)
    assert [(name, length) for _, _, name, length in found] == [
        ("long", MAX_FUNCTION_LINES + 1)]


def _package_of(path):
    """The dotted package a module at `path` imports relative to."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1])


def _imported_names(source, package):
    """(line, module) for every module `source` imports, at any depth.

    `from a import b` gives both `a` and `a.b` (b may be a submodule);
    relative imports are resolved against `package`;
    `importlib.import_module("...")` and `__import__("...")` with a
    literal name count too.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}")
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) == "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_within(module, package):
    return module == package or module.startswith(package + ".")


def test_layers_import_none_of_the_tools():
    offenders = sorted({
        f"{_relative(path)}:{line} imports {module}"
        for path in _sources(PACKAGE / "layers")
        for line, module in _imported_names(path.read_text(),
                                            _package_of(path))
        if any(_is_within(module, banned)
               for banned in LAYERS_MUST_NOT_IMPORT)
    })
    assert not offenders, (
        "kerasbn.layers must not depend on "
        f"{', '.join(LAYERS_MUST_NOT_IMPORT)}: " + "; ".join(offenders))


def test_import_scan_sees_every_import_form():
    # The rule above passes vacuously if the scan misses an import form.
    source = ("def f():\n"
              "    from kerasbn import registry\n"
              "    from ..stats import recalibrate\n"
              "    import kerasbn.folding.plan\n"
              "    importlib.import_module('kerasbn.exporting')\n"
              "    from ..quantization.report import quantization_report\n"
              "from . import mabn\n")
    modules = [m for _, m in _imported_names(source, "kerasbn.layers")]
    for banned in LAYERS_MUST_NOT_IMPORT:
        assert any(_is_within(m, banned) for m in modules), (banned, modules)
    assert "kerasbn.layers.mabn" in modules
    assert _package_of(PACKAGE / "layers" / "mabn.py") == "kerasbn.layers"
    assert _package_of(PACKAGE / "layers" / "__init__.py") == (
        "kerasbn.layers")


@pytest.mark.parametrize("name", PRIVATE_APIS)
def test_private_apis_are_read_in_one_module(name):
    users = [_relative(path) for path in _sources(PACKAGE)
             if name in path.read_text()]
    assert users == [_relative(INTERNAL_MODULE)], (
        f"'{name}' must appear in {_relative(INTERNAL_MODULE)} and nowhere "
        f"else in kerasbn/; found in: {users}")


def test_keras_layout_is_checked_for_the_installed_keras():
    installed = keras.__version__
    assert _keras_internal.check_layout() == installed
    major_minor = ".".join(installed.split(".")[:2])
    assert major_minor in _keras_internal.CHECKED_KERAS, (
        f"Keras {installed} is installed; kerasbn/_keras_internal.py was "
        f"checked against Keras {', '.join(_keras_internal.CHECKED_KERAS)}")


def test_a_missing_private_attribute_names_it_and_the_versions():
    with pytest.raises(_keras_internal.KerasLayoutError) as error:
        _keras_internal._get(object(), "_nodes_by_depth",
                             "a model's graph nodes")
    message = str(error.value)
    assert "_nodes_by_depth" in message, message
    assert f"Keras {keras.__version__}" in message, message
    for version in _keras_internal.CHECKED_KERAS:
        assert version in message, message


def test_fold_and_export_are_plain_functions_of_plain_packages():
    for name in ("fold", "export"):
        function = getattr(kerasbn, name)
        assert inspect.isfunction(function), (
            f"kerasbn.{name} is {type(function).__name__}, not a function")
    for name in ("kerasbn.folding", "kerasbn.exporting"):
        module = sys.modules[name]
        assert type(module) is types.ModuleType, (
            f"sys.modules[{name!r}] is a {type(module).__qualname__}, not a "
            "plain module")
    assert kerasbn.fold is kerasbn.folding.fold
    assert kerasbn.export is kerasbn.exporting.export


_REGISTRATION = """
import sys, tempfile, os
{first}
import keras
light = "tensorflow" not in sys.modules or {keras_first}
path = os.path.join(tempfile.mkdtemp(), "m.keras")
bn = keras.saving.get_registered_object("kerasbn>BatchNormalization")
assert bn is not None, "kerasbn's layers are not registered with Keras"
model = keras.Sequential([keras.Input((3,)), bn(zero_debias=True)])
model.save(path)
""" + """
reloaded = keras.models.load_model(path)
assert type(reloaded.layers[0]) is bn, type(reloaded.layers[0])
print("ok")
"""


@pytest.mark.parametrize("keras_first", [False, True])
def test_import_kerasbn_registers_layers_in_either_import_order(keras_first):
    # `import kerasbn` is lazy (the CLI answers --help without TensorFlow),
    # but it must still register kerasbn's layers with Keras, whether Keras
    # was imported before it or after it.
    first = "import keras\nimport kerasbn" if keras_first else "import kerasbn"
    code = _REGISTRATION.format(first=first, keras_first=keras_first)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_import_kerasbn_alone_does_not_load_tensorflow():
    code = "import sys, kerasbn; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
