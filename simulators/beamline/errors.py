"""Error model: the hidden imperfections of a machine, redrawn at every reset.

Ranges are half-widths of uniform distributions (``x ~ U(-r, r)``) except the BPM
noise, which is the standard deviation of Gaussian noise added to every reading, and
the module-wide scales (``[low, high]``, log-uniform), which describe machines whose
physics differs from the lattice file (the ``foreign`` family, the ``broad`` training
preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, model_validator

from core.config import ConfigError, load_yaml_model, parse_model, read_yaml

from .lattice import Cavity, Drift, Lattice, Solenoid


class ErrorModel(BaseModel):
    """Ranges of the random machine errors (all configurable from YAML)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf would switch a check off

    name: str = "custom"
    solenoid_misalignment_mm: NonNegativeFloat = Field(3.0, description="dx, dy ~ U(-r, r)")
    cavity_misalignment_mm: NonNegativeFloat = Field(3.0, description="dx, dy ~ U(-r, r)")
    solenoid_field_error: NonNegativeFloat = Field(0.0, le=0.5, description="relative, U(-r, r)")
    corrector_scale_error: NonNegativeFloat = Field(0.0, le=0.5, description="relative, U(-r, r)")
    bpm_offset_mm: NonNegativeFloat = Field(0.0, description="U(-r, r) per plane")
    bpm_noise_mm: NonNegativeFloat = Field(0.05, description="Gaussian sigma per reading")
    beam_offset_mm: NonNegativeFloat = Field(0.0, description="incoming x, y ~ U(-r, r)")
    beam_angle_mrad: NonNegativeFloat = Field(0.0, description="incoming x', y' ~ U(-r, r)")
    # Physics that differs from the lattice file (one factor per machine, log-uniform).
    solenoid_field_scale: tuple[PositiveFloat, PositiveFloat] = Field((1.0, 1.0), description="all solenoids' field x")
    corrector_kick_scale: tuple[PositiveFloat, PositiveFloat] = Field((1.0, 1.0), description="all correctors' kick per unit x")
    cavity_defocus_scale: tuple[PositiveFloat, PositiveFloat] = Field((1.0, 1.0), description="RF defocusing x")
    element_position_mm: NonNegativeFloat = Field(0.0, description="each drift's length +U(-r, r)")
    bpm_gain_error: NonNegativeFloat = Field(0.0, le=0.5, description="relative, per BPM plane, U(-r, r)")
    bpm_rotation_mrad: NonNegativeFloat = Field(0.0, le=200, description="per BPM, U(-r, r)")
    corrector_polarity_flip: float = Field(0.0, ge=0.0, le=1.0, description="probability a corrector is wired reversed")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "ErrorModel":
        for name in ("solenoid_field_scale", "corrector_kick_scale", "cavity_defocus_scale"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} above high {high}")
        return self

    def draw(self, lattice: Lattice, rng: np.random.Generator, batch: int = 1) -> "MachineErrors":
        """Draw `batch` independent machines."""
        n_sol = sum(isinstance(e, Solenoid) for e in lattice.elements)
        n_cav = sum(isinstance(e, Cavity) for e in lattice.elements)

        n_drift = sum(isinstance(e, Drift) for e in lattice.elements)

        def u(r: float, *shape: int) -> np.ndarray:
            return rng.uniform(-r, r, size=(batch, *shape))

        def module_scale(bounds: tuple[float, float]) -> np.ndarray:
            low, high = np.log(bounds[0]), np.log(bounds[1])
            return np.exp(rng.uniform(low, high, size=(batch, 1))) if high > low else np.full((batch, 1), bounds[0])

        # Draw order is fixed: the base errors first, so presets without the new fields
        # draw exactly the machines they always drew (published numbers depend on it).
        errors = MachineErrors(
            solenoid_offset_mm=u(self.solenoid_misalignment_mm, n_sol, 2),
            cavity_offset_mm=u(self.cavity_misalignment_mm, n_cav, 2),
            solenoid_scale=1.0 + u(self.solenoid_field_error, n_sol),
            corrector_scale=1.0 + u(self.corrector_scale_error, lattice.n_correctors),
            bpm_offset_mm=u(self.bpm_offset_mm, lattice.n_bpm, 2),
            beam_offset_mm=u(self.beam_offset_mm, 2),
            beam_angle_mrad=u(self.beam_angle_mrad, 2),
            bpm_noise_mm=self.bpm_noise_mm,
        )
        if self.differs_from_lattice:
            flips = np.where(rng.uniform(size=(batch, lattice.n_correctors)) < self.corrector_polarity_flip, -1.0, 1.0)
            errors.solenoid_scale = errors.solenoid_scale * module_scale(self.solenoid_field_scale)
            errors.corrector_scale = errors.corrector_scale * module_scale(self.corrector_kick_scale) * flips
            errors.cavity_defocus = np.repeat(module_scale(self.cavity_defocus_scale), n_cav, axis=1)
            errors.drift_delta_mm = u(self.element_position_mm, n_drift)
            errors.bpm_gain = 1.0 + u(self.bpm_gain_error, lattice.n_bpm, 2)
            errors.bpm_rotation_mrad = u(self.bpm_rotation_mrad, lattice.n_bpm)
        return errors

    @property
    def differs_from_lattice(self) -> bool:
        """True if machines drawn from this model have physics other than the lattice file's."""
        return (any(tuple(getattr(self, n)) != (1.0, 1.0)
                    for n in ("solenoid_field_scale", "corrector_kick_scale", "cavity_defocus_scale"))
                or any((self.element_position_mm, self.bpm_gain_error, self.bpm_rotation_mrad, self.corrector_polarity_flip)))


@dataclass
class MachineErrors:
    """One drawn batch of machines; every array has the batch as first axis."""

    solenoid_offset_mm: np.ndarray  # (B, n_solenoid, 2)
    cavity_offset_mm: np.ndarray  # (B, n_cavity, 2)
    solenoid_scale: np.ndarray  # (B, n_solenoid)
    corrector_scale: np.ndarray  # (B, n_corrector)
    bpm_offset_mm: np.ndarray  # (B, n_bpm, 2)
    beam_offset_mm: np.ndarray  # (B, 2)
    beam_angle_mrad: np.ndarray  # (B, 2)
    bpm_noise_mm: float
    # Physics other than the lattice file's (None: as the file says).
    cavity_defocus: np.ndarray | None = None  # (B, n_cavity) x the file's defocus_scale
    drift_delta_mm: np.ndarray | None = None  # (B, n_drift) added to each drift's length
    bpm_gain: np.ndarray | None = None  # (B, n_bpm, 2) x the file's gains
    bpm_rotation_mrad: np.ndarray | None = None  # (B, n_bpm) + the file's rotation

    @property
    def batch(self) -> int:
        return self.corrector_scale.shape[0]

    @classmethod
    def nominal(cls, lattice: Lattice, batch: int = 1) -> "MachineErrors":
        """A perfect machine (what the design model assumes)."""
        return ErrorModel(
            solenoid_misalignment_mm=0, cavity_misalignment_mm=0, bpm_noise_mm=0
        ).draw(lattice, np.random.default_rng(0), batch)



PRESETS_FILE = resources.files("simulators.beamline") / "errors" / "presets.yaml"


class _PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf would switch a check off
    presets: dict[str, ErrorModel]


def preset_names() -> list[str]:
    return sorted(load_yaml_model(_PresetFile, Path(str(PRESETS_FILE))).presets)


def load_error_model(name_or_path: str | Path) -> ErrorModel:
    """A shipped preset (`train`, `test`, `hard`) or a YAML file with one error model."""
    presets = load_yaml_model(_PresetFile, Path(str(PRESETS_FILE))).presets
    if str(name_or_path) in presets:
        model = presets[str(name_or_path)]
        return model.model_copy(update={"name": str(name_or_path)})
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"error model {str(name_or_path)!r}: not a preset ({', '.join(sorted(presets))}) "
            "and not a file"
        )
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of error-model fields")
    data.setdefault("name", path.stem)
    return parse_model(ErrorModel, data, str(path))
