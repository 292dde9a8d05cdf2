"""Register :class:`~nni_elastic.nni.OptunaTuner` with NNI as a named tuner (``nnictl algo register``).

NNI 3.0 keeps user-registered algorithms in ``registered_algorithms.yml`` in its config
directory: ``$NNI_CONFIG_DIR`` if set, else ``<sys.prefix>/nni`` inside a virtualenv or conda
environment, else ``~/.config/nni`` (``nni.runtime.config.get_config_directory``). ``nnictl algo
register --meta FILE`` reads a meta file (``algoType``, ``builtinName``, ``className``), checks
that the class imports and adds it there; experiments started with the same config directory
can then say ``tuner: {name: OptunaTuner, classArgs: {...}}``.

:func:`register_tuner` runs exactly those steps of ``nnictl algo register`` (its own functions,
in this process); :func:`write_tuner_meta` writes the meta file for running ``nnictl`` yourself.

Example:
    >>> register_tuner()                    # or: nni-elastic nni register
    >>> write_tuner_meta("optuna_tuner.yml")  # then: nnictl algo register --meta optuna_tuner.yml
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml

__all__ = ["TUNER_META", "tuner_meta_yaml", "write_tuner_meta", "register_tuner", "unregister_tuner", "registry_file"]

#: the ``nnictl algo register`` meta file, as a mapping
TUNER_META = {"algoType": "tuner", "builtinName": "OptunaTuner", "className": "nni_elastic.nni.OptunaTuner"}

PathLike = Union[str, os.PathLike]


def tuner_meta_yaml() -> str:
    """The meta file's text (``algoType: tuner``, ``builtinName: OptunaTuner``, ``className: ...``)."""
    return yaml.safe_dump(TUNER_META, sort_keys=False)


def write_tuner_meta(path: PathLike) -> Path:
    """Write the meta file for ``nnictl algo register --meta <path>``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tuner_meta_yaml())
    return path


@contextlib.contextmanager
def _config_dir(config_dir: Optional[PathLike]) -> Iterator[None]:
    """Temporarily point NNI at another config directory (``NNI_CONFIG_DIR``)."""
    if config_dir is None:
        yield
        return
    previous = os.environ.get("NNI_CONFIG_DIR")
    os.environ["NNI_CONFIG_DIR"] = str(config_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("NNI_CONFIG_DIR", None)
        else:
            os.environ["NNI_CONFIG_DIR"] = previous


def registry_file(config_dir: Optional[PathLike] = None) -> Path:
    """NNI's ``registered_algorithms.yml`` (created from NNI's default when missing)."""
    from nni.runtime.config import get_config_file

    with _config_dir(config_dir):
        return get_config_file("registered_algorithms.yml")


def register_tuner(config_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """Register ``OptunaTuner`` as NNI does for ``nnictl algo register --meta <meta file>``; returns its entry.

    Args:
        config_dir: NNI config directory to register in (default: NNI's, see the module
            docstring); experiments see it when ``nnictl`` runs with ``NNI_CONFIG_DIR`` set to it.

    Re-registering updates the entry. Raises ``ValueError`` if a name clash with NNI's built-in
    algorithms prevents it.
    """
    from nni.tools import package_utils
    from nni.tools.nnictl.algo_management import read_reg_meta_list, verify_algo_import

    with _config_dir(config_dir), tempfile.TemporaryDirectory() as tmp:
        for meta in read_reg_meta_list(str(write_tuner_meta(Path(tmp) / "optuna_tuner.yml"))):
            old = package_utils.get_algo_meta(meta.name)
            if old is not None and old.is_builtin:
                raise ValueError(f"cannot register {meta.name!r}: NNI has a built-in algorithm of that name")
            verify_algo_import(meta)
            package_utils.register_algo_meta(meta)
        entry = package_utils.get_algo_meta(TUNER_META["builtinName"])
        if entry is None or entry.class_name != TUNER_META["className"]:
            raise RuntimeError(f"registering {TUNER_META['builtinName']} in {registry_file()} did not take effect")
        return {**entry.dump(), "registry": str(registry_file())}


def unregister_tuner(config_dir: Optional[PathLike] = None) -> bool:
    """Remove the ``OptunaTuner`` entry (``nnictl algo unregister OptunaTuner``); False if it was not registered."""
    from nni.tools import package_utils

    with _config_dir(config_dir):
        entry = package_utils.get_algo_meta(TUNER_META["builtinName"])
        if entry is None or entry.is_builtin:
            return False
        package_utils.unregister_algo_meta(entry.name)
        return True
