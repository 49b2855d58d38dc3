"""Third-party defenses: loading the modules that register them.

A defense registers itself when its module is imported (``defenses.register_defense`` and
``search_spaces.register_space``, see docs/adding-a-defense.md). Two ways to get it imported:

* a spec's or trial config's ``plugins:`` list — each entry a module name (``mylab.defenses``) or
  the path of a ``.py`` file; every Ray worker loads the same list before building its trial;
* an installed package that declares an entry point in the group ``robust_study.defenses``
  (loaded the first time anything asks for the defense names).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

__all__ = ["ENTRY_POINT_GROUP", "defense_names", "load_entry_points", "load_plugin_field", "load_plugins", "resolve_plugin"]

ENTRY_POINT_GROUP = "robust_study.defenses"

_loaded: set[str] = set()
_entry_points_loaded = False


def resolve_plugin(ref: str, base: Path | None = None) -> str:
    """A plug-in reference as it will be loaded: ``.py`` paths made absolute (workers run elsewhere)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"plugin {ref!r} must be a module name or the path of a .py file")
    if ref.endswith(".py"):
        path = Path(ref).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return str(path.resolve())
    return ref


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"plugin file {str(path)!r} does not exist")
    # A stable module name per file, so importing the same file twice registers once.
    name = "robust_study_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path))
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # A plug-in's space file may sit beside it and be imported by name.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_plugins(refs: Iterable[str]) -> None:
    """Import each plug-in once (module names or ``.py`` paths).

    Raises:
        ValueError: one line naming the plug-in and why it could not be loaded.
    """
    for ref in refs:
        if ref in _loaded:
            continue
        try:
            if ref.endswith(".py"):
                _import_file(Path(ref))
            else:
                importlib.import_module(ref)
        except ValueError as err:
            if str(err).startswith("plugin"):
                raise
            raise ValueError(f"plugin {ref!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        except Exception as err:  # noqa: BLE001 - any import failure is the user's plug-in's
            first = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(f"plugin {ref!r} could not be loaded: {type(err).__name__}: {first}") from None
        _loaded.add(ref)


def load_plugin_field(refs: list[str]) -> list[str]:
    """A config's ``plugins:`` list: resolved, loaded, and returned as it will be recorded.

    Shared by the trial config and the study spec, whose validators run it before they read a
    defense name (field order), so a plug-in's defense is known there.
    """
    resolved = [resolve_plugin(ref) for ref in refs]
    load_plugins(resolved)
    return resolved


def load_entry_points() -> None:
    """Import every installed ``robust_study.defenses`` entry point (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"defense plug-in entry point {ep.name!r} ({ep.value}) could not be loaded: {err}") from None


def defense_names() -> list[str]:
    """Every registered defense (built-ins and installed plug-ins), sorted."""
    import defenses

    load_entry_points()
    return defenses.list_defenses()
