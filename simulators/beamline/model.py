"""Beam transport of a lattice with Cheetah, and its linear orbit response.

The orbit (beam centroid) of a linear lattice with misalignments is an affine function
of the corrector settings: ``B(M) = B0 + R @ M``. :class:`BeamlineModel` computes B0
and R for a whole batch of machines with *one* batched Cheetah tracking call (the
zero setting plus one unit kick per corrector), so an environment step is a small
matrix-vector product while Cheetah tracking stays the ground truth (the tests check
that both agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from cheetah import (
    BPM,
    Drift,
    HorizontalCorrector,
    ParameterBeam,
    Quadrupole,
    Segment,
    Solenoid,
    Species,
    VerticalCorrector,
)
from cheetah.accelerator.element import Element
from cheetah.track_methods import misalignment_matrix
from cheetah.utils import compute_relativistic_factors

from . import lattice as lat
from .errors import MachineErrors

DTYPE = torch.float64


class LowBetaCavity(Element):
    """Low-beta RF cavity: half drift, thin accelerating gap, half drift.

    Cheetah's ``Cavity`` is written for relativistic electrons (wrong sign and NaN for
    ions), so the thin-gap formulas of Wangler, *RF Linear Accelerators* ch. 7, are
    used here, with the phase convention of ion linacs (0 = crest, negative =
    bunching):

    - energy gain ``dW = q V T cos(phi)``;
    - transverse RF kick ``dPx c = -pi q V T sin(phi) x / (beta^2 gamma^2 lambda)``
      (defocusing for bunching phases), with beta, gamma at the gap centre;
    - adiabatic damping: ``x'`` is normalised to the outgoing momentum.

    :param voltage: peak gap voltage E0*L in V.
    :param phase: synchronous phase in rad.
    :param frequency: RF frequency in Hz.
    """

    supported_tracking_methods = ["linear"]

    def __init__(
        self,
        length: torch.Tensor,
        voltage: torch.Tensor,
        transit_time_factor: torch.Tensor,
        phase: torch.Tensor,
        frequency: torch.Tensor,
        misalignment: torch.Tensor | None = None,
        name: str | None = None,
        defocus: torch.Tensor | None = None,
    ) -> None:
        super().__init__(name=name, sanitize_name=True, dtype=length.dtype)
        self.length = length
        self.register_buffer("voltage", voltage)
        self.register_buffer("transit_time_factor", transit_time_factor)
        self.register_buffer("phase", phase)
        self.register_buffer("frequency", frequency)
        # Scale of the transverse RF kick (1: the thin-gap formula; calibration fits it).
        self.defocus = defocus if defocus is not None else torch.ones((), dtype=length.dtype)
        self.register_buffer(
            "misalignment",
            misalignment if misalignment is not None else torch.zeros(2, dtype=length.dtype),
        )

    def energy_gain(self, species: Species) -> torch.Tensor:
        """Energy gain in eV of the synchronous particle."""
        return species.num_elementary_charges * self.voltage * self.transit_time_factor * self.phase.cos()

    def _momentum_ev(self, energy: torch.Tensor, species: Species) -> torch.Tensor:
        return (energy.square() - species.mass_eV.square()).clamp_min(0).sqrt()

    def first_order_transfer_map(self, energy: torch.Tensor, species: Species) -> torch.Tensor:
        energy_out = energy + self.energy_gain(species)
        p_in = self._momentum_ev(energy, species)
        p_out = self._momentum_ev(energy_out, species)
        gamma_mid, _, beta_mid = compute_relativistic_factors(
            0.5 * (energy + energy_out), species.mass_eV
        )
        wavelength = 299_792_458.0 / self.frequency
        kick = self.defocus * (
            -math.pi
            * species.num_elementary_charges
            * self.voltage
            * self.transit_time_factor
            * self.phase.sin()
            / (beta_mid.square() * gamma_mid.square() * wavelength * p_out)
        )
        damping = p_in / p_out
        shape = torch.broadcast_shapes(kick.shape, energy.shape, self.misalignment.shape[:-1])
        gap = torch.eye(7, dtype=energy.dtype).repeat(*shape, 1, 1)
        for pos, mom in ((0, 1), (2, 3)):
            gap[..., mom, pos] = kick
            gap[..., mom, mom] = damping
        gap[..., 5, 5] = damping
        half = self.length / 2
        before = Drift(length=half, dtype=energy.dtype).first_order_transfer_map(energy, species)
        after = Drift(length=half, dtype=energy.dtype).first_order_transfer_map(energy_out, species)
        r_entry, r_exit = misalignment_matrix(self.misalignment)
        return r_exit @ after @ gap @ before @ r_entry

    def track(self, incoming):
        outgoing = self._track_first_order(incoming)
        outgoing.energy = incoming.energy + self.energy_gain(incoming.species)
        return outgoing

    @property
    def is_skippable(self) -> bool:
        return False

    def plot(self, s, vector_idx=None, ax=None):
        """Lattice plots are not drawn through Cheetah here."""
        return ax

    @property
    def is_active(self) -> bool:
        return bool((self.voltage != 0).any())

    @property
    def defining_features(self) -> list[str]:
        return super().defining_features + [
            "length", "voltage", "transit_time_factor", "phase", "frequency", "misalignment", "defocus",
        ]


def as_tensor(a) -> torch.Tensor:
    """float64 tensor of an array or a tensor (a tensor keeps its autograd graph)."""
    if isinstance(a, torch.Tensor):
        return a.to(DTYPE)
    return torch.as_tensor(np.asarray(a), dtype=DTYPE)


def cheetah_species(species: lat.Species) -> Species:
    return Species(
        species.name or "ion",
        num_elementary_charges=torch.tensor(species.charge_state, dtype=DTYPE),
        mass_eV=torch.tensor(species.mass_mev * 1e6, dtype=DTYPE),
        dtype=DTYPE,
    )


@dataclass
class Observables:
    """Orbit at the BPMs (with BPM offsets, no noise) and at aperture points, in mm."""

    bpm_mm: torch.Tensor  # (..., n_bpm, 2)
    aperture_mm: torch.Tensor  # (..., n_aperture, 2)


@dataclass
class Response:
    """Affine orbit model of a batch of machines: readings = b0 + r @ settings."""

    b0: np.ndarray  # (B, n_readings) mm, order x1, y1, x2, y2, ...
    r: np.ndarray  # (B, n_readings, n_correctors) mm per simulator unit
    ap0: np.ndarray  # (B, n_aperture_points) radial distance is computed from x, y pairs
    ap_r: np.ndarray  # (B, 2 * n_aperture_points, n_correctors)
    aperture_radius_mm: np.ndarray  # (n_aperture_points,)

    def readings(self, settings: np.ndarray) -> np.ndarray:
        """Noise-free BPM readings (B, n_readings) for settings (B, n_correctors)."""
        return self.b0 + np.einsum("bij,bj->bi", self.r, settings)

    def beam_lost(self, settings: np.ndarray) -> np.ndarray:
        """(B,) True where the centroid is outside an aperture anywhere."""
        pos = self.ap0 + np.einsum("bij,bj->bi", self.ap_r, settings)
        radius = np.hypot(pos[:, 0::2], pos[:, 1::2])
        return (radius > self.aperture_radius_mm).any(axis=1)



class BeamlineModel:
    """Builds Cheetah segments for a lattice and tracks the beam centroid through them."""

    def __init__(self, lattice: lat.Lattice):
        self.lattice = lattice
        self.species = cheetah_species(lattice.species)
        self.energy_ev = (lattice.kinetic_energy_mev + lattice.species.mass_mev) * 1e6
        self.aperture_radius_mm = np.array(
            [r for e in lattice.elements for r in self._aperture_points(e)], dtype=float
        )

    @staticmethod
    def _aperture_points(e) -> list[float]:
        """Apertures checked after each sub-element (solenoid centre and exit, cavity exit)."""
        if isinstance(e, lat.Solenoid):
            return [e.aperture_mm, e.aperture_mm]
        if isinstance(e, (lat.Cavity, lat.Quadrupole)):
            return [e.aperture_mm]
        if isinstance(e, lat.Aperture):
            return [e.radius_mm]
        return []

    def segment(self, errors: MachineErrors, settings: torch.Tensor) -> Segment:
        """Cheetah segment for a batch of machines.

        `settings` has shape (B, K, n_correctors): K corrector configurations for each
        of the B machines; element parameters broadcast to (B, K).
        """
        t = as_tensor
        lattice = self.lattice
        kick_rad = lattice.corrector_kick_mrad_per_unit * 1e-3
        per_unit = t([lattice.corrector_kick_scale.get(n, 1.0) for n in lattice.corrector_names]) * kick_rad
        angles = settings * t(errors.corrector_scale)[:, None, :] * per_unit
        corrector_index = {n: i for i, n in enumerate(lattice.corrector_names)}
        energy = self.energy_ev
        elements: list[Element] = []
        n_sol = n_cav = n_bpm = n_ap = n_drift = 0
        batch = errors.batch

        def monitor(name: str, offset: torch.Tensor | None = None) -> None:
            elements.append(BPM(is_active=True, name=name, misalignment=offset, dtype=DTYPE, sanitize_name=True))

        def aperture_monitor() -> None:
            nonlocal n_ap
            monitor(f"ap{n_ap}")
            n_ap += 1

        def corrector(name: str, plane: str) -> Element:
            cls = HorizontalCorrector if plane == "h" else VerticalCorrector
            return cls(length=t(0.0), angle=angles[..., corrector_index[name]], name=name, sanitize_name=True, dtype=DTYPE)

        for e in lattice.elements:
            brho = lat.rigidity(energy / 1e6 - lattice.species.mass_mev, lattice.species)
            if isinstance(e, lat.Drift):
                length = t(e.length)
                if errors.drift_delta_mm is not None:  # an element sits elsewhere than the file says
                    length = (length + t(errors.drift_delta_mm)[:, n_drift, None] * 1e-3).clamp_min(0.0)
                elements.append(Drift(length=length, dtype=DTYPE))
                n_drift += 1
            elif isinstance(e, lat.Solenoid):
                field = e.field * lattice.solenoid_max_field_t * t(errors.solenoid_scale[:, n_sol])[:, None]
                mis = t(errors.solenoid_offset_mm[:, n_sol] * 1e-3)[:, None, :]
                half = dict(length=t(e.length / 2), k=field / (2 * brho), misalignment=mis, dtype=DTYPE)
                elements.append(Solenoid(name=f"{e.name}_a", sanitize_name=True, **half))
                aperture_monitor()
                for plane, name in (("h", e.steerer_h), ("v", e.steerer_v)):
                    if name:
                        elements.append(corrector(name, plane))
                elements.append(Solenoid(name=f"{e.name}_b", sanitize_name=True, **half))
                aperture_monitor()
                n_sol += 1
            elif isinstance(e, lat.Corrector):
                elements.append(corrector(e.name, e.plane))
            elif isinstance(e, lat.Quadrupole):
                elements.append(Quadrupole(length=t(e.length), k1=t(e.gradient_t_per_m / brho), name=e.name, sanitize_name=True, dtype=DTYPE))
                aperture_monitor()
            elif isinstance(e, lat.Cavity):
                cav = LowBetaCavity(
                    length=t(e.length), voltage=t(e.voltage_mv * 1e6),
                    transit_time_factor=t(e.transit_time_factor), phase=t(math.radians(e.phase_deg)),
                    frequency=t(e.frequency_mhz * 1e6),
                    misalignment=t(errors.cavity_offset_mm[:, n_cav] * 1e-3)[:, None, :], name=e.name,
                    defocus=e.defocus_scale * (t(errors.cavity_defocus)[:, n_cav, None] if errors.cavity_defocus is not None
                                               else torch.ones(batch, 1, dtype=DTYPE)),
                )
                energy += float(cav.energy_gain(self.species))
                elements.append(cav)
                aperture_monitor()
                n_cav += 1
            elif isinstance(e, lat.Bpm):
                monitor(f"bpm_{e.name}", t(errors.bpm_offset_mm[:, n_bpm] * 1e-3)[:, None, :])
                n_bpm += 1
            elif isinstance(e, lat.Aperture):
                aperture_monitor()
        return Segment(elements=elements, name=lattice.name.replace("-", "_"), sanitize_name=True)

    def incoming_beam(self, errors: MachineErrors) -> ParameterBeam:
        off = torch.as_tensor(errors.beam_offset_mm * 1e-3, dtype=DTYPE)[:, None, :]
        ang = torch.as_tensor(errors.beam_angle_mrad * 1e-3, dtype=DTYPE)[:, None, :]
        return ParameterBeam.from_parameters(
            mu_x=off[..., 0], mu_px=ang[..., 0], mu_y=off[..., 1], mu_py=ang[..., 1],
            energy=torch.tensor(self.energy_ev, dtype=DTYPE), species=self.species, dtype=DTYPE,
        )

    def track(self, errors: MachineErrors, settings: np.ndarray | torch.Tensor) -> Observables:
        """Track the centroid with Cheetah; settings (B, K, n_correctors) -> (B, K, ...) mm."""
        settings = as_tensor(settings)
        segment = self.segment(errors, settings)
        segment.track(self.incoming_beam(errors))
        bpms = [e for e in segment.elements if isinstance(e, BPM)]
        shape = settings.shape[:-1]

        def stack(items: list[BPM]) -> torch.Tensor:
            if not items:
                return torch.zeros(*shape, 0, 2, dtype=DTYPE)
            return torch.stack([b.reading.expand(*shape, 2) for b in items], dim=-2) * 1e3

        return Observables(
            bpm_mm=self._bpm_electronics(errors, stack([b for b in bpms if b.name.startswith("bpm_")])),
            aperture_mm=stack([b for b in bpms if b.name.startswith("ap")]),
        )

    def _bpm_electronics(self, errors: MachineErrors, position_mm: torch.Tensor) -> torch.Tensor:
        """What BPMs report: gain * rotation @ (position - offset) per BPM."""
        specs = [e for e in self.lattice.elements if isinstance(e, lat.Bpm)]
        gain = torch.tensor([[b.gain_x, b.gain_y] for b in specs], dtype=DTYPE)  # (n_bpm, 2)
        angle = torch.tensor([b.rotation_mrad * 1e-3 for b in specs], dtype=DTYPE)  # (n_bpm,)
        if errors.bpm_gain is not None:
            gain = gain * as_tensor(errors.bpm_gain)[:, None]  # (B, 1, n_bpm, 2)
        if errors.bpm_rotation_mrad is not None:
            angle = angle + as_tensor(errors.bpm_rotation_mrad)[:, None] * 1e-3  # (B, 1, n_bpm)
        if not angle.requires_grad and not torch.any(angle != 0) and not gain.requires_grad and torch.all(gain == 1):
            return position_mm  # an ideal BPM: keep the published numbers bit for bit
        x, y = position_mm[..., 0], position_mm[..., 1]
        c, s = angle.cos(), angle.sin()
        return torch.stack([c * x + s * y, -s * x + c * y], dim=-1) * gain

    def response_tensors(self, errors: MachineErrors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b0, r, ap0, ap_r) as tensors, differentiable in any tensor-valued error field."""
        n = self.lattice.n_correctors
        probes = torch.cat([torch.zeros(1, n, dtype=DTYPE), torch.eye(n, dtype=DTYPE)])  # (1 + n, n), unit kicks
        obs = self.track(errors, probes.expand(errors.batch, 1 + n, n))
        flat_bpm = obs.bpm_mm.flatten(-2)  # (B, 1+n, n_readings)
        flat_ap = obs.aperture_mm.flatten(-2)
        return (flat_bpm[:, 0], (flat_bpm[:, 1:] - flat_bpm[:, :1]).transpose(1, 2),
                flat_ap[:, 0], (flat_ap[:, 1:] - flat_ap[:, :1]).transpose(1, 2))

    def response(self, errors: MachineErrors) -> Response:
        """B0 and R for each machine, from one batched tracking call."""
        with torch.no_grad():
            b0, r, ap0, ap_r = (x.numpy() for x in self.response_tensors(errors))
        return Response(b0=b0, r=r, ap0=ap0, ap_r=ap_r, aperture_radius_mm=self.aperture_radius_mm)

    def exit_energy_mev_per_u(self) -> float:
        """Kinetic energy per nucleon after the lattice (design beam)."""
        energy = self.energy_ev
        for e in self.lattice.elements:
            if isinstance(e, lat.Cavity):
                energy += self.lattice.species.charge_state * e.voltage_mv * 1e6 * e.transit_time_factor * math.cos(math.radians(e.phase_deg))
        return (energy / 1e6 - self.lattice.species.mass_mev) / self.lattice.species.mass_number
