"""The callback interface of the training loop (in the manner of OLMo-core's ``Callback``).

The loop calls, in order of ``priority`` (highest first)::

    pre_train()                                   after set-up and resume, before the first step
    for every step:
        pre_step(step)                            step = the number the step will have once done (1-based)
        post_step(step, metrics)                  after the optimizer step; may add entries to ``metrics``
        log_metrics(step, metrics)                the step's final metrics: sinks write them here
        end_step(step)                            the step is complete and logged: checkpoints are saved here
    post_train(summary)                           after the last step; may add entries to ``summary``
    on_error(exc)                                 instead of post_train when the loop raises
    close()                                       always, last

``state_dict`` / ``load_state_dict`` go into checkpoints (under ``name``), so a resumed run restores its callbacks.
A callback reaches the loop through ``self.trainer`` (set before ``pre_train``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from megatron_dual.config import ConfigError

if TYPE_CHECKING:
    from megatron_dual.trainer import Trainer

__all__ = ["Callback", "load_callback"]


class Callback:
    priority: int = 0

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    @property
    def name(self) -> str:
        """Key of this callback's state in checkpoints."""
        return type(self).__name__

    def pre_train(self) -> None:
        pass

    def pre_step(self, step: int) -> None:
        pass

    def post_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def end_step(self, step: int) -> None:
        pass

    def post_train(self, summary: dict[str, Any]) -> None:
        pass

    def on_error(self, exc: BaseException) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def load_callback(spec: str, field: str = "train.callbacks") -> Callback:
    """Instantiate the callback class named by an import path, ``package.module:Class`` or ``package.module.Class``
    (called without arguments); ConfigError naming ``field`` and ``spec`` otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} is not an import path of the form package.module:Class")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import {module_name!r} for {spec!r}: {e}") from e
    except AttributeError as e:
        raise ConfigError(f"{field}: module {module_name!r} has no {attr!r} (from {spec!r})") from e
    callback = obj() if isinstance(obj, type) else obj
    if not isinstance(callback, Callback):
        raise ConfigError(
            f"{field}: {spec!r} is not a megatron_dual.callbacks.Callback (got {type(callback).__name__})"
        )
    return callback
