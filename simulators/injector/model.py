"""Light-particle injector: LEBT and RFQ, tracked particle by particle with Cheetah.

Losses are computed, not assumed: a ``ParticleBeam`` from the source's Twiss
parameters is tracked through drifts, solenoids and steerers (Cheetah elements); the
beam pipe's ``Aperture`` elements mark lost particles; the current transformer (ACCT)
at the RFQ entrance counts the survivors; the RFQ accepts the particles inside its
matched acceptance ellipse (in x and y) and entrance aperture, and captures a fixed
fraction of them longitudinally; the Faraday cup counts what remains.

Transmission = cup / ACCT, as measured on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import torch
from cheetah import Aperture, Drift, HorizontalCorrector, ParticleBeam, Segment, Solenoid, VerticalCorrector
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from simulators.beamline.lattice import Species, rigidity
from simulators.beamline.model import DTYPE, cheetah_species
from core.config import load_shipped_or_file, shipped_yaml_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf would switch a check off


class SourceBeam(_Strict):
    current_ma: PositiveFloat
    emittance_mm_mrad: PositiveFloat = Field(description="rms geometric emittance, both planes")
    alpha: float
    beta_m: PositiveFloat
    particles: PositiveInt = 4000


class Drift_(_Strict):
    type: Literal["drift"]
    name: str
    length: float = Field(ge=0)


class Solenoid_(_Strict):
    type: Literal["solenoid"]
    name: str
    length: PositiveFloat
    max_field_t: PositiveFloat
    step_t: PositiveFloat = Field(0.01, description="largest change per tuning step, T")


class Steerer(_Strict):
    """A horizontal and vertical steerer pair (two knobs: NAME:H and NAME:V)."""

    type: Literal["steerer"]
    name: str
    max_kick_mrad: PositiveFloat
    step_mrad: PositiveFloat = Field(3.0, description="largest change per tuning step, mrad")


class Aperture_(_Strict):
    type: Literal["aperture"]
    name: str
    radius_mm: PositiveFloat


class CurrentTransformer(_Strict):
    type: Literal["current_transformer"]
    name: str


class Rfq(_Strict):
    """RFQ as seen by the LEBT: a matched acceptance ellipse and a capture factor."""

    type: Literal["rfq"]
    name: str
    alpha: float
    beta_m: PositiveFloat
    acceptance_mm_mrad: PositiveFloat = Field(description="Courant-Snyder invariant limit, both planes")
    aperture_mm: PositiveFloat
    capture_factor: float = Field(gt=0, le=1)


class FaradayCup(_Strict):
    type: Literal["faraday_cup"]
    name: str


InjectorElement = Annotated[
    Union[Drift_, Solenoid_, Steerer, Aperture_, CurrentTransformer, Rfq, FaradayCup], Field(discriminator="type")
]


class InjectorLattice(_Strict):
    name: str
    description: str = ""
    species: Species
    kinetic_energy_per_nucleon_mev: PositiveFloat
    beam: SourceBeam
    elements: list[InjectorElement] = Field(min_length=1)

    @property
    def knob_names(self) -> list[str]:
        """Solenoid fields (T) and steerer kicks (mrad), in beam order."""
        names: list[str] = []
        for e in self.elements:
            if isinstance(e, Solenoid_):
                names.append(e.name)
            elif isinstance(e, Steerer):
                names += [f"{e.name}:H", f"{e.name}:V"]
        return names

    @property
    def knob_limits(self) -> list[tuple[float, float]]:
        limits: list[tuple[float, float]] = []
        for e in self.elements:
            if isinstance(e, Solenoid_):
                limits.append((0.0, e.max_field_t))
            elif isinstance(e, Steerer):
                limits += [(-e.max_kick_mrad, e.max_kick_mrad)] * 2
        return limits

    @property
    def knob_steps(self) -> list[float]:
        """Largest change per tuning step of every knob (T or mrad), in knob order."""
        steps: list[float] = []
        for e in self.elements:
            if isinstance(e, Solenoid_):
                steps.append(e.step_t)
            elif isinstance(e, Steerer):
                steps += [e.step_mrad] * 2
        return steps

    @property
    def rfq(self) -> Rfq:
        return next(e for e in self.elements if isinstance(e, Rfq))


LATTICE_DIR = resources.files("simulators.injector") / "lattices"


def shipped_injectors() -> list[str]:
    return shipped_yaml_names(LATTICE_DIR)


def load_injector(name_or_path: str | Path) -> InjectorLattice:
    return load_shipped_or_file(InjectorLattice, LATTICE_DIR, name_or_path, "injector lattice", "lattice")


@dataclass
class SourceErrors:
    """What differs from the design beam at the source (one machine)."""

    offset_mm: tuple[float, float] = (0.0, 0.0)
    angle_mrad: tuple[float, float] = (0.0, 0.0)
    beta_scale: float = 1.0
    alpha_shift: float = 0.0
    current_scale: float = 1.0
    solenoid_scale: tuple[float, ...] = ()  # field calibration error per solenoid


@dataclass
class Currents:
    source_ma: float
    acct_ma: float
    cup_ma: float

    @property
    def transmission(self) -> float:
        """Cup / ACCT, as the machine measures it."""
        return self.cup_ma / self.acct_ma if self.acct_ma > 0 else 0.0


class InjectorModel:
    """Tracks a fixed particle sample (seeded) through the LEBT for given knob settings."""

    def __init__(self, lattice: InjectorLattice, errors: SourceErrors | None = None, seed: int = 0):
        self.lattice = lattice
        self.errors = errors or SourceErrors()
        self.species = cheetah_species(lattice.species)
        kinetic = lattice.kinetic_energy_per_nucleon_mev * lattice.species.mass_number
        self.energy_ev = (kinetic + lattice.species.mass_mev) * 1e6
        self.rigidity = rigidity(kinetic, lattice.species)
        torch.manual_seed(seed)  # the particle sample is part of the machine: fixed per seed
        self.source = self._source_beam()

    def _source_beam(self) -> ParticleBeam:
        b, e = self.lattice.beam, self.errors
        t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
        beam = ParticleBeam.from_twiss(
            num_particles=b.particles,
            beta_x=t(b.beta_m * e.beta_scale), alpha_x=t(b.alpha + e.alpha_shift), emittance_x=t(b.emittance_mm_mrad * 1e-6),
            beta_y=t(b.beta_m * e.beta_scale), alpha_y=t(b.alpha + e.alpha_shift), emittance_y=t(b.emittance_mm_mrad * 1e-6),
            energy=t(self.energy_ev), species=self.species, dtype=DTYPE,
        )
        particles = beam.particles.clone()
        particles[..., 0] += e.offset_mm[0] * 1e-3
        particles[..., 2] += e.offset_mm[1] * 1e-3
        particles[..., 1] += e.angle_mrad[0] * 1e-3
        particles[..., 3] += e.angle_mrad[1] * 1e-3
        return ParticleBeam(particles, beam.energy, particle_charges=beam.particle_charges, species=self.species, dtype=DTYPE)

    def segment(self, knobs: np.ndarray) -> tuple[Segment, list[str]]:
        """Cheetah segment up to the ACCT, and the names of its aperture elements."""
        t = lambda v: torch.as_tensor(v, dtype=DTYPE)  # noqa: E731
        elements, apertures, k, n_sol = [], [], 0, 0
        scales = self.errors.solenoid_scale
        for e in self.lattice.elements:
            if isinstance(e, Drift_):
                elements.append(Drift(length=t(e.length), name=e.name, dtype=DTYPE))
            elif isinstance(e, Solenoid_):
                field = knobs[k] * (scales[n_sol] if n_sol < len(scales) else 1.0)
                elements.append(Solenoid(length=t(e.length), k=t(field / (2 * self.rigidity)), name=e.name, dtype=DTYPE))
                k += 1
                n_sol += 1
            elif isinstance(e, Steerer):
                elements.append(HorizontalCorrector(length=t(0.0), angle=t(knobs[k] * 1e-3), name=f"{e.name}_H", dtype=DTYPE))
                elements.append(VerticalCorrector(length=t(0.0), angle=t(knobs[k + 1] * 1e-3), name=f"{e.name}_V", dtype=DTYPE))
                k += 2
            elif isinstance(e, Aperture_):
                r = t(e.radius_mm * 1e-3)
                elements.append(Aperture(x_max=r, y_max=r, shape="elliptical", name=e.name, dtype=DTYPE))
                apertures.append(e.name)
            elif isinstance(e, CurrentTransformer):
                break
        return Segment(elements=elements, name=self.lattice.name), apertures

    def at_rfq(self, knobs: np.ndarray) -> ParticleBeam:
        """The beam arriving at the ACCT / RFQ entrance."""
        segment, _ = self.segment(np.asarray(knobs, dtype=float))
        return segment.track(self.source) if segment.elements else self.source

    def rfq_accepted(self, beam: ParticleBeam) -> torch.Tensor:
        """Per particle: inside the RFQ's acceptance ellipse (x and y) and entrance aperture."""
        rfq = self.lattice.rfq
        gamma = (1 + rfq.alpha**2) / rfq.beta_m
        p = beam.particles
        limit = rfq.acceptance_mm_mrad * 1e-6
        inside = torch.ones(p.shape[:-1], dtype=torch.bool)
        for pos, mom in ((0, 1), (2, 3)):
            x, xp = p[..., pos], p[..., mom]
            invariant = gamma * x**2 + 2 * rfq.alpha * x * xp + rfq.beta_m * xp**2
            inside &= invariant <= limit
        inside &= torch.hypot(p[..., 0], p[..., 2]) <= rfq.aperture_mm * 1e-3
        return inside

    def currents(self, knobs: np.ndarray) -> Currents:
        beam = self.at_rfq(knobs)
        alive = beam.survival_probabilities
        source = self.lattice.beam.current_ma * self.errors.current_scale
        acct = source * float(alive.sum()) / alive.numel()
        accepted = float((alive * self.rfq_accepted(beam)).sum()) / alive.numel()
        cup = source * accepted * self.lattice.rfq.capture_factor
        return Currents(source, acct, cup)
