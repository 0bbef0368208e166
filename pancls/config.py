"""Config files: YAML mapped onto dataclasses, with ``key.sub=value`` overrides and strict validation.

Every experiment writes the fully resolved config into its run folder (``config.yaml``) so that a run
can be re-read and resumed exactly. Unknown keys and wrongly typed values are refused with a
:class:`~pancls.errors.UserError` naming the key, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Type, TypeVar

import yaml

from pancls.errors import UserError, exception_text
from pancls.validation import InvalidParameter, check_choice

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing, unreadable or non-mapping file is a :class:`UserError`."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError("config file not found", path) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read config: not UTF-8 text (byte {exc.start}: {exc.reason})", path) from None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read config: {exception_text(exc, path)}", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping at its top level", path)
    return data


def apply_flags(data: dict, flags: Mapping[str, Any]) -> dict:
    """Set ``"section.key": value`` command-line flags into a config dict, in place, skipping ``None``
    (a flag the user did not give); returns it."""
    for key, value in flags.items():
        if value is not None:
            section, _, name = key.rpartition(".")
            node = data.setdefault(section, {}) if section else data
            node[name] = value
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value", "--set")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section", "--set")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise UserError(f"expected a mapping, got {value!r}", where)
        return from_dict(annotation, value, where)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(exc.reason)
        raise UserError("; ".join(errors), where)
    if origin is typing.Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean; map it back onto the word the key allows
            words = ("off", "no", "false") if value is False else ("on", "yes", "true")
            value = next((a for a in args if a in words), value)
        return check_choice(value, where, args)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"expected a list, got {value!r}", where)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"expected a mapping, got {value!r}", where)
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"expected true or false, got {value!r}", where)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"expected an integer, got {value!r}", where)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"expected a number, got {value!r}", where)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {value!r}", where)
        return value
    return value


def from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types.

    Nested dataclass fields take nested mappings; missing keys keep their defaults.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"expected a mapping, got {data!r}", where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(fields))}", where)
    kwargs = {name: _coerce(value, hints[name], key_path(where, name)) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except InvalidParameter as exc:  # a check of pancls.validation, named by its argument: add the section
        raise InvalidParameter(exc.reason, key_path(where, str(exc.where))) from None
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc), where) from None
    return obj


def key_path(where: str, key: str) -> str:
    """The name of ``key`` inside ``where``: ``train.epochs`` in a section, ``ingest.yaml: selection`` at the
    root of a config file (a file name and a key joined by a dot would read as one file name)."""
    is_file = where.endswith((".yaml", ".yml", ".json")) or os.sep in where
    return f"{where}: {key}" if is_file and ": " not in where else f"{where}.{key}"


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass or mapping as YAML, atomically."""
    from pancls.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


#: Config keys (dotted) holding a file or folder path, read relative to the working directory: the data file of
#: `pancls lt`, the manifest and folders of `pancls cv`, pretrained backbone weights and a run to start the backbone
#: from, of both.
PATH_KEYS = ("data.path", "data.train_list", "data.eval_list", "data.manifest", "data.root", "data.cache_dir",
             "model.backbone_kwargs.pretrained", "model.init_backbone_from")


def absolute_paths(data: dict, keys: Iterable[str] = PATH_KEYS) -> dict:
    """Make each relative path under ``keys`` of a config mapping absolute (``os.path.abspath``: against the
    working directory, ``..`` folded), in place; returns it.

    The resolved ``config.yaml`` a command writes, and the config a resumed run is compared with, then name a
    file the same way however it was typed: ``cifar10.npz`` from the data folder and ``/data/cifar10.npz`` are
    one file, not "a different config". Keys that are missing, empty or not text are left alone."""
    for key in keys:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name]:
            node[name] = os.path.abspath(node[name])
    return data
