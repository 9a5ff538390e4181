"""Lattice files: species, energy and an ordered list of beamline elements.

A lattice is plain data (as in Cheetah): this module only describes and validates it;
:mod:`simulators.beamline.model` turns it into Cheetah elements and tracks beams.
"""

from __future__ import annotations

import math
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from core.config import load_shipped_or_file, shipped_yaml_names

AMU_MEV = 931.49410242
ELECTRON_MASS_MEV = 0.51099895
SPEED_OF_LIGHT = 299_792_458.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf would switch a check off


class Species(_Strict):
    """Ion species: mass number A, charge state Q and rest mass."""

    name: str = ""
    mass_number: PositiveFloat
    charge_state: PositiveFloat
    rest_mass_mev: PositiveFloat | None = Field(
        default=None, description="Rest mass in MeV; default A * u - Q * m_e."
    )

    @property
    def mass_mev(self) -> float:
        if self.rest_mass_mev is not None:
            return self.rest_mass_mev
        return self.mass_number * AMU_MEV - self.charge_state * ELECTRON_MASS_MEV


class Drift(_Strict):
    type: Literal["drift"]
    name: str = ""
    length: float = Field(ge=0, description="m")


class Solenoid(_Strict):
    """Superconducting solenoid; optional embedded steering coils at its centre."""

    type: Literal["solenoid"]
    name: str
    length: PositiveFloat = Field(description="m")
    field: float = Field(ge=-1.5, le=1.5, description="normalised; sign is polarity")
    aperture_mm: PositiveFloat = 20.0
    steerer_h: str | None = None
    steerer_v: str | None = None


class Corrector(_Strict):
    """Thin steering magnet (one plane)."""

    type: Literal["corrector"]
    name: str
    plane: Literal["h", "v"]


class Quadrupole(_Strict):
    type: Literal["quadrupole"]
    name: str
    length: PositiveFloat = Field(description="m")
    gradient_t_per_m: float
    aperture_mm: PositiveFloat = 20.0


class Cavity(_Strict):
    """Low-beta RF cavity modelled as a thin accelerating gap in its centre."""

    type: Literal["cavity"]
    name: str
    length: PositiveFloat = Field(description="m")
    voltage_mv: float = Field(ge=0, description="peak gap voltage E0*L, MV")
    transit_time_factor: float = Field(gt=0, le=1)
    phase_deg: float = Field(ge=-180, le=180, description="synchronous phase, 0 = crest, <0 bunching")
    frequency_mhz: PositiveFloat
    aperture_mm: PositiveFloat = 20.0
    defocus_scale: PositiveFloat = Field(1.0, description="transverse RF defocusing relative to the thin-gap formula "
                                         "(1 = nominal; calibration fits it)")


class Bpm(_Strict):
    """Beam position monitor; gain and rotation are its electronics' calibration:
    reading = gain * rotation(rotation_mrad) @ (position - offset)."""

    type: Literal["bpm"]
    name: str
    gain_x: PositiveFloat = 1.0
    gain_y: PositiveFloat = 1.0
    rotation_mrad: float = Field(0.0, ge=-500, le=500)


class Aperture(_Strict):
    type: Literal["aperture"]
    name: str
    radius_mm: PositiveFloat


ElementSpec = Annotated[
    Union[Drift, Solenoid, Corrector, Quadrupole, Cavity, Bpm, Aperture],
    Field(discriminator="type"),
]


class Lattice(_Strict):
    """A beamline: species, energy, element list and corrector calibration."""

    name: str
    description: str = ""
    species: Species
    kinetic_energy_per_nucleon_mev: PositiveFloat
    solenoid_max_field_t: PositiveFloat = Field(
        description="Field in T of a solenoid at normalised setting 1.0"
    )
    corrector_kick_mrad_per_unit: PositiveFloat = Field(
        description="Kick in mrad of one simulator unit at the design rigidity"
    )
    corrector_limit: PositiveFloat = Field(default=40.0, description="simulator units")
    corrector_kick_scale: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="per-corrector multiplier of corrector_kick_mrad_per_unit (default 1); "
        "calibration sets it so one unit of every corrector moves the orbit about as much as on the nominal lattice")
    derived_from: str = Field("", description="the lattice this one was calibrated from (its pretrained policy "
                              "is the starting point for fine-tuning)")
    elements: list[ElementSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> "Lattice":
        seen: set[str] = set()
        for name in [e.name for e in self.elements if e.name] + self.corrector_names:
            if name in seen:
                raise ValueError(f"name {name!r} is used twice")
            seen.add(name)
        if not self.bpm_names:
            raise ValueError("a lattice needs at least one bpm")
        if not self.corrector_names:
            raise ValueError("a lattice needs at least one corrector or solenoid steerer")
        unknown = sorted(set(self.corrector_kick_scale) - set(self.corrector_names))
        if unknown:
            raise ValueError(f"corrector_kick_scale names unknown correctors {unknown}")
        return self

    @cached_property
    def corrector_names(self) -> list[str]:
        """Correctors in beam order, embedded steerers as (h, v) of their solenoid."""
        names: list[str] = []
        for e in self.elements:
            if isinstance(e, Solenoid):
                names += [n for n in (e.steerer_h, e.steerer_v) if n]
            elif isinstance(e, Corrector):
                names.append(e.name)
        return names

    @cached_property
    def bpm_names(self) -> list[str]:
        return [e.name for e in self.elements if isinstance(e, Bpm)]

    @property
    def n_bpm(self) -> int:
        return len(self.bpm_names)

    @property
    def n_readings(self) -> int:
        """BPM readings in the order x1, y1, x2, y2, ..."""
        return 2 * self.n_bpm

    @property
    def reading_names(self) -> list[str]:
        return [f"{b}:{p}" for b in self.bpm_names for p in ("x", "y")]

    @property
    def n_correctors(self) -> int:
        return len(self.corrector_names)

    @property
    def kinetic_energy_mev(self) -> float:
        return self.kinetic_energy_per_nucleon_mev * self.species.mass_number

    @property
    def rigidity_tm(self) -> float:
        """Magnetic rigidity B*rho in T*m of the design beam at the lattice entrance."""
        return rigidity(self.kinetic_energy_mev, self.species)

    def fingerprint(self) -> dict:
        """What a policy must match to be used on this lattice."""
        return {
            "name": self.name,
            "n_bpm": self.n_bpm,
            "n_correctors": self.n_correctors,
            "bpm_names": self.bpm_names,
            "corrector_names": self.corrector_names,
        }


def rigidity(kinetic_mev: float, species: Species) -> float:
    """B*rho in T*m for a total kinetic energy in MeV."""
    total = kinetic_mev + species.mass_mev
    pc_mev = math.sqrt(total**2 - species.mass_mev**2)
    return pc_mev * 1e6 / (species.charge_state * SPEED_OF_LIGHT)


LATTICE_DIR = resources.files("simulators.beamline") / "lattices"


def shipped_lattices() -> list[str]:
    return shipped_yaml_names(LATTICE_DIR)


def load_lattice(name_or_path: str | Path) -> Lattice:
    """Load a shipped lattice by name (e.g. ``cafe2-cm1``) or a lattice file by path."""
    return load_shipped_or_file(Lattice, LATTICE_DIR, name_or_path, "lattice", "lattice")
