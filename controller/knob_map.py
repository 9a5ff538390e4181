"""Running a policy on a calibrated machine whose response differs from the policy's model.

A policy trained on one setup acts in that setup's knobs ``v``; on a machine whose
calibrated response ``R_m`` differs from the policy's ``R_p``, the machine gets
``p = start + T (v - start)`` with ``T`` the least-squares map that makes the machine
answer as the policy expects: ``R_m T ≈ R_p``. The policy then sees the response it
was trained on (measured: the shipped orbit policy corrects foreign cryomodules whose
solenoids are 1.5-1.7x ours through this map, where a fine-tune from it did not reach
the bar). The map is a setting transform only: the safety layer below it still checks
every physical write, and the mismatch guard checks the machine against ``R_m``.
Task-agnostic: only matrices and the plant interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.config import ConfigError
from core.plant import Plant

# A map this far from reproducing the policy's response, or this ill-conditioned, would
# ask the policy to control a machine it has never seen: refuse and say to fine-tune.
MAX_RESIDUAL = 0.2  # |R_m T - R_p| / |R_p| (Frobenius)
MAX_CONDITION = 50.0
# Matrices this close are the same model (the fine-tuned policy on its own calibrated
# machine, or the shipped policy on the nominal machine file): no map.
SAME_MODEL = 1e-3


@dataclass
class KnobMap:
    """``T`` with how well ``R_m T`` reproduces ``R_p`` and how ill-conditioned it is."""

    matrix: np.ndarray  # n_knobs x n_knobs: machine knob change per policy knob change
    residual: float
    condition: float
    machine_response: np.ndarray  # R_m: what the mismatch guard checks the machine against

    @classmethod
    def fit(cls, machine_response: np.ndarray, policy_response: np.ndarray) -> "KnobMap":
        r_m, r_p = np.asarray(machine_response, dtype=float), np.asarray(policy_response, dtype=float)
        if r_m.shape != r_p.shape:
            raise ConfigError(f"knob map: machine response {r_m.shape} and the policy's {r_p.shape} differ in shape")
        t = np.linalg.lstsq(r_m, r_p, rcond=None)[0]
        residual = float(np.linalg.norm(r_m @ t - r_p) / max(np.linalg.norm(r_p), 1e-12))
        return cls(t, residual, float(np.linalg.cond(t)), r_m)

    def problem(self) -> str | None:
        """Why this map must not be used (None if it may)."""
        if not np.isfinite(self.condition) or self.condition > MAX_CONDITION:
            return (f"knob map condition number {self.condition:.3g} > {MAX_CONDITION:g} "
                    "(some policy directions would need huge settings)")
        if self.residual > MAX_RESIDUAL:
            return (f"the machine cannot reproduce the policy's response through any knob map "
                    f"(relative residual {self.residual:.2f} > {MAX_RESIDUAL:g})")
        return None

    def describe(self) -> str:
        return f"relative residual {self.residual:.3f}, condition number {self.condition:.1f}"


def knob_map_for(machine_response: np.ndarray | None, policy_response: np.ndarray | None) -> KnobMap | None:
    """The map for a policy on a machine (None when either has no model or they agree);
    ConfigError, before anything is written, if no usable map exists."""
    if machine_response is None or policy_response is None:
        return None
    r_m, r_p = np.asarray(machine_response, dtype=float), np.asarray(policy_response, dtype=float)
    if r_m.shape == r_p.shape and np.linalg.norm(r_m - r_p) <= SAME_MODEL * np.linalg.norm(r_p):
        return None
    mapping = KnobMap.fit(r_m, r_p)
    problem = mapping.problem()
    if problem:
        raise ConfigError(f"the policy's lattice differs from this machine's calibrated one and {problem}: "
                          "fine-tune a policy on the calibrated lattice (tbsac train ... --init-from pretrained)")
    return mapping


class MappedKnobs:
    """The plant as a policy with a different model sees it: its knob settings ``v``
    become ``start + T (v - start)`` on `inner` (a guarded plant). A mapped step beyond
    a knob's largest step is scaled down as a whole, so the direction the policy chose
    is kept (the guard would clip knob by knob); settings are read back through ``T⁻¹``.
    Everything else passes through to `inner`."""

    def __init__(self, inner, mapping: KnobMap, start: np.ndarray):
        self._inner, self._map = inner, mapping
        self._start = np.asarray(start, dtype=float).copy()
        self._max_step = np.array([k.max_step for k in inner.knobs], dtype=float)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def to_machine(self, values: np.ndarray) -> np.ndarray:
        return self._start + self._map.matrix @ (np.asarray(values, dtype=float) - self._start)

    def from_machine(self, values: np.ndarray) -> np.ndarray:
        return self._start + np.linalg.solve(self._map.matrix, np.asarray(values, dtype=float) - self._start)

    def read_knobs(self) -> np.ndarray:
        return self.from_machine(self._inner.read_knobs())

    def write_knobs(self, values: np.ndarray) -> None:
        current = np.asarray(self._inner.settings, dtype=float)
        step = self.to_machine(values) - current
        largest = np.max(np.abs(step) / self._max_step) if len(step) else 0.0
        self._inner.write_knobs(current + step / max(1.0, float(largest)))


def mapped(plant: Plant, mapping: KnobMap | None, start: np.ndarray):
    """`plant` seen through `mapping` (itself when there is none)."""
    return plant if mapping is None else MappedKnobs(plant, mapping, start)
