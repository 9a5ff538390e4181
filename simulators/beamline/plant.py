"""A simulated cryomodule as a plant: correctors as knobs, BPM readings in mm."""

from __future__ import annotations

import numpy as np

from core.plant import KnobSpec, ReadingSpec, Readings, SimulatedPlant

from .errors import ErrorModel, MachineErrors
from .lattice import Lattice
from .model import BeamlineModel, Response

# The beam starts to scrape when its centroid comes within this distance of an
# aperture (about 3 sigma of a 1 mm rms beam); transmission falls linearly to zero.
SCRAPING_MARGIN_MM = 3.0
BPM_RANGE_MM = 20.0  # BPM electronics saturate here


def transmission(response: Response, settings: np.ndarray) -> np.ndarray:
    """(B,) fraction of beam current that survives every aperture."""
    pos = response.ap0 + np.einsum("bij,bj->bi", response.ap_r, settings)
    radius = np.hypot(pos[:, 0::2], pos[:, 1::2])
    clearance = (response.aperture_radius_mm - radius) / SCRAPING_MARGIN_MM
    return np.clip(clearance, 0.0, 1.0).prod(axis=1)


class OrbitSimPlant(SimulatedPlant):
    """One simulated cryomodule with hidden errors drawn from an error model.

    Readings are computed from the machine's linear response (from Cheetah tracking at
    reset) plus BPM offsets and Gaussian noise; ``interlocks['beam_current']`` is the
    transmitted fraction of the beam.
    """

    faults = ("BEAM_LOSS",)  # 1: 80 % of the beam is scraped off downstream

    def __init__(self, lattice: Lattice, error_model: ErrorModel, model: BeamlineModel | None = None):
        self._beam_loss = False
        self.lattice = lattice
        self.error_model = error_model
        self.model = model or BeamlineModel(lattice)
        limit = lattice.corrector_limit
        self.knobs = [KnobSpec(n, "simulator units", -limit, limit, np.inf) for n in lattice.corrector_names]
        self.readings = [ReadingSpec(n, "mm", -BPM_RANGE_MM, BPM_RANGE_MM) for n in lattice.reading_names]
        self.errors: MachineErrors | None = None
        self.response: Response | None = None
        self._settings = np.zeros(lattice.n_correctors)
        self._rng = np.random.default_rng()

    def reset(self, seed: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.errors = self.error_model.draw(self.lattice, rng, 1)
        self.response = self.model.response(self.errors)
        self._rng = rng
        self._settings = np.zeros(self.lattice.n_correctors)

    def read_knobs(self) -> np.ndarray:
        return self._settings.copy()

    def write_knobs(self, values: np.ndarray) -> None:
        # A power supply cannot go beyond its range: clamp as the hardware would.
        self._settings = self.clip_to_limits(values)

    def true_orbit(self) -> np.ndarray:
        """Noise-free readings (with BPM offsets) at the current settings, mm."""
        assert self.response is not None, "reset() first"
        return self.response.readings(self._settings[None])[0]

    def beam_current(self) -> float:
        assert self.response is not None, "reset() first"
        return float(transmission(self.response, self._settings[None])[0])

    def set_fault(self, name: str, value: int) -> None:
        if name != "BEAM_LOSS":
            super().set_fault(name, value)
        self._beam_loss = bool(value)

    def read(self) -> Readings:
        assert self.errors is not None, "reset() first"
        values = self.true_orbit() + self._rng.normal(0.0, self.errors.bpm_noise_mm, self.lattice.n_readings)
        current = self.beam_current()
        valid = np.full(values.shape, current > 0.0)
        values = np.where(valid, values, np.nan)
        return Readings(values, self.now(len(values)), valid, {"beam_current": current * (0.2 if self._beam_loss else 1.0)})
