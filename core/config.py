"""Loading YAML configuration files into pydantic models with one-line errors.

Every configuration file in the project (lattices, error models, machine files) goes
through :func:`load_yaml_model`, so a bad file always produces a :class:`ConfigError`
naming the file, the field and what was expected, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A user-supplied file or value is wrong; the message names file and field."""


def printable(text: str) -> str:
    """`text` with control characters escaped: a message naming user input stays one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _field_path(loc: tuple, data: object) -> str:
    """Render a pydantic error location, naming list items by their `name` if any."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, dict) and "name" in node:
                    label = f"[{item}]({printable(str(node['name']))})"
            parts.append(label)
            continue
        # Discriminated unions add the tag (the element's `type`) as a location step;
        # it is noise to a user.
        if isinstance(node, dict) and item not in node and node.get("type") == item:
            continue
        parts.append(("." if parts else "") + printable(str(item)))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def validation_message(source: str, exc: ValidationError, data: object) -> str:
    """One line describing the first validation error of `exc` in file `source`."""
    err = exc.errors()[0]
    field = _field_path(tuple(err["loc"]), data)
    msg = err["msg"]
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: field '{field}': {printable(msg)}{extra}"


def parse_model(model: type[ModelT], data: object, source: str) -> ModelT:
    """Validate already-parsed data; raise ConfigError naming `source` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(source, exc, data)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a configuration file") from None


MAX_CONFIG_BYTES = 1_000_000  # configuration files are small; anything bigger is refused unread


def read_yaml(path: Path) -> object:
    """Parse a YAML file, turning every way it can be wrong into a one-line ConfigError.

    Refused: files over 1 MB (before reading them), binary files, malformed YAML,
    integers too long to convert, nesting too deep to parse.
    """
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; configuration files are limited to {MAX_CONFIG_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration file") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ConfigError(f"{path}: unreadable value ({str(exc).splitlines()[0]})") from None


def shipped_yaml_names(directory) -> list[str]:
    """Names (without ``.yaml``) of the YAML files shipped in a package `directory`."""
    return sorted(p.name[:-5] for p in directory.iterdir() if p.name.endswith(".yaml"))


def load_shipped_or_file(model: type[ModelT], directory, name_or_path: str | Path, what: str, shipped: str) -> ModelT:
    """A setup by shipped name (``<directory>/<name>.yaml``) or by file path, as `model`;
    an unknown name is a ConfigError naming `what` it is and the shipped ones."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        candidate = directory / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"{what} {name_or_path!r}: not a file and not a shipped {shipped} "
                              f"(shipped: {', '.join(shipped_yaml_names(directory))})")
        path = Path(str(candidate))
    return load_yaml_model(model, path)


def load_preset_or_file(model: type[ModelT], presets: dict[str, ModelT], name_or_path, what: str) -> ModelT:
    """A preset by name or a YAML file of `model`; anything else is a ConfigError naming
    `what` it is and the presets."""
    if str(name_or_path) in presets:
        return presets[str(name_or_path)]
    path = Path(str(name_or_path))
    if not path.is_file():
        raise ConfigError(f"{what} {name_or_path!r}: expected one of {', '.join(sorted(presets))} or a YAML file")
    return load_yaml_model(model, path)


def reading_positions(names: list[str], needed: tuple[str, ...], task: str) -> list[int]:
    """Positions of the `needed` readings among a plant's reading `names` (any case);
    a ConfigError naming the missing ones."""
    lowered = [n.lower() for n in names]
    missing = [n for n in needed if n not in lowered]
    if missing:
        raise ConfigError(f"the {task} task needs readings named {', '.join(needed)}; "
                          f"missing: {', '.join(missing)} (has: {', '.join(names)})")
    return [lowered.index(n) for n in needed]


def load_yaml_model(model: type[ModelT], path: Path) -> ModelT:
    """Read `path` as YAML and validate it as `model`."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_model(model, data, str(path))
