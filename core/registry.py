"""Tasks by name, imported only when asked for (like Xopt's ``get_generator``).

Shipped tasks are listed below as ``"module:Class"``; more can be registered in code
(:func:`register_task`) or, for another process (``tbsac`` started by a test or a
plugin), through the environment: ``TBSAC_TASKS="name=module:Class,..."``.
"""

from __future__ import annotations

import importlib
import os

from .config import ConfigError
from .task import TaskDefinition

_REGISTRY: dict[str, str | type[TaskDefinition]] = {
    "orbit": "simulators.beamline.definition:OrbitDefinition",
    "rfq": "simulators.injector.definition:RfqDefinition",
    "battery": "simulators.battery.definition:BatteryDefinition",
    "bubble": "simulators.bubble.definition:BubbleDefinition",
    "crop": "simulators.crop.definition:CropDefinition",
}
_LOADED: dict[str, TaskDefinition] = {}


def register_task(name: str, definition: str | type[TaskDefinition]) -> None:
    """Register a task definition class (or its ``"module:Class"`` path) under `name`."""
    _REGISTRY[name] = definition
    _LOADED.pop(name, None)


def _from_environment() -> None:
    for item in filter(None, (s.strip() for s in os.environ.get("TBSAC_TASKS", "").split(","))):
        name, _, target = item.partition("=")
        if not target or ":" not in target:
            raise ConfigError(f"TBSAC_TASKS: {item!r} is not name=module:Class")
        _REGISTRY.setdefault(name.strip(), target.strip())


def task_names() -> list[str]:
    """Every registered task, shipped first."""
    _from_environment()
    return list(_REGISTRY)


def task_modules() -> list[str]:
    """Modules of the tasks registered by path (a process that will open machines can import them ahead)."""
    _from_environment()
    return [target.partition(":")[0] for target in _REGISTRY.values() if isinstance(target, str)]


def get_task(name: str) -> TaskDefinition:
    """The definition of task `name`; ConfigError naming the known tasks if there is none."""
    _from_environment()
    if name in _LOADED:
        return _LOADED[name]
    target = _REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"task {name!r}: unknown; registered tasks: {', '.join(_REGISTRY)}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"task {name!r}: cannot import {module}:{attr} ({exc})") from None
    definition = target()
    if definition.name != name:
        raise ConfigError(f"task {name!r}: its definition calls itself {definition.name!r}")
    _LOADED[name] = definition
    return definition


def task_for_setup(name_or_path: str, task: str | None = None) -> tuple[TaskDefinition, object]:
    """(definition, setup) for a setup name or file, trying every task unless `task` is given.

    A shipped name belongs to the task that ships it; a file is the first task's setup
    that validates (every setup model forbids unknown fields).
    """
    names = [task] if task else task_names()
    for n in names:
        definition = get_task(n)
        if name_or_path in definition.shipped_setups():
            return definition, definition.load_setup(name_or_path)
    errors = []
    for n in names:
        definition = get_task(n)
        try:
            return definition, definition.load_setup(name_or_path)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    shipped = ", ".join(s for n in names for s in get_task(n).shipped_setups())
    raise ConfigError(f"lattice {name_or_path!r}: not a shipped lattice ({shipped}) and not a lattice file of any task "
                      f"({'; '.join(errors)})")
