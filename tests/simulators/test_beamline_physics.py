"""Physics of the beamline simulator against analytic formulas and Cheetah tracking."""

import math

import numpy as np
import pytest
import torch
from cheetah import Drift, ParameterBeam

from simulators.beamline.errors import MachineErrors, load_error_model
from simulators.beamline.lattice import load_lattice, rigidity
from simulators.beamline.model import DTYPE, BeamlineModel, LowBetaCavity, cheetah_species

LATTICES = ["cafe2-cm1", "cafe2-cm2", "cafe2-cm3"]


@pytest.fixture(scope="module")
def cm1():
    return load_lattice("cafe2-cm1")


def test_rigidity_of_ar12_at_1356_mev_per_u(cm1):
    # p c = sqrt(T^2 + 2 T m c^2) with T = 40 * 1.356 MeV, m c^2 = 37218.59 MeV.
    t, m = 40 * 1.356, 37218.59
    expected = math.sqrt(t * t + 2 * t * m) * 1e6 / (12 * 299_792_458.0)
    assert cm1.rigidity_tm == pytest.approx(expected, rel=1e-12)
    assert cm1.rigidity_tm == pytest.approx(0.5587, abs=1e-3)


def test_drift_matrix_is_analytic(cm1):
    species = cheetah_species(cm1.species)
    energy = torch.tensor(BeamlineModel(cm1).energy_ev, dtype=DTYPE)
    r = Drift(length=torch.tensor(0.085, dtype=DTYPE), dtype=DTYPE).first_order_transfer_map(energy, species)
    expected = np.eye(4)
    expected[0, 1] = expected[2, 3] = 0.085
    np.testing.assert_allclose(r[:4, :4].numpy(), expected, atol=1e-15)


def test_solenoid_matrix_is_analytic(cm1):
    """Larmor-frame solenoid matrix (Wiedemann) with k = B / (2 B rho)."""
    model = BeamlineModel(cm1)
    seg = model.segment(MachineErrors.nominal(cm1), torch.zeros(1, 1, cm1.n_correctors, dtype=DTYPE))
    by_name = {e.name: e for e in seg.elements}
    sol_a, sol_b = by_name["SOL1_a"], by_name["SOL1_b"]  # the halves around its steerers
    field = 0.81 * cm1.solenoid_max_field_t
    k = field / (2 * rigidity(cm1.kinetic_energy_mev, cm1.species))
    length = 0.35
    energy = torch.tensor(model.energy_ev, dtype=DTYPE)
    r = (sol_b.first_order_transfer_map(energy, model.species) @ sol_a.first_order_transfer_map(energy, model.species))
    r = r.reshape(7, 7)[:4, :4].numpy()
    c, s = math.cos(k * length), math.sin(k * length)
    expected = np.array([
        [c * c, s * c / k, s * c, s * s / k],
        [-k * s * c, c * c, -k * s * s, s * c],
        [-s * c, -s * s / k, c * c, s * c / k],
        [k * s * s, -s * c, -k * s * c, c * c],
    ])
    np.testing.assert_allclose(r, expected, atol=1e-12)


def _cavity(phase_deg: float, misalignment=(0.0, 0.0)) -> LowBetaCavity:
    t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    return LowBetaCavity(t(0.205), t(0.6e6), t(0.85), t(math.radians(phase_deg)), t(162.5e6), t(misalignment), name="gap")


@pytest.mark.parametrize("phase", np.linspace(-180, 180, 73))
def test_cavity_is_finite_for_every_phase(cm1, phase):
    model = BeamlineModel(cm1)
    beam = ParameterBeam.from_parameters(mu_x=torch.tensor(1e-3, dtype=DTYPE), mu_px=torch.tensor(1e-3, dtype=DTYPE),
                                         energy=torch.tensor(model.energy_ev, dtype=DTYPE), species=model.species, dtype=DTYPE)
    out = _cavity(phase).track(beam)
    assert torch.isfinite(out.mu).all() and torch.isfinite(out.cov).all() and torch.isfinite(out.energy)


def test_cavity_energy_gain_sign_and_thin_gap_formula(cm1):
    species = cheetah_species(cm1.species)
    for phase, sign in ((0, 1), (-30, 1), (-45, 1), (30, 1), (-120, -1), (180, -1)):
        gain = float(_cavity(phase).energy_gain(species))
        assert np.sign(gain) == sign
        assert gain == pytest.approx(12 * 0.6e6 * 0.85 * math.cos(math.radians(phase)), rel=1e-12)
    assert abs(float(_cavity(90).energy_gain(species))) < 1e-6 * 12 * 0.6e6


def test_cavity_defocuses_at_bunching_phase_and_damps(cm1):
    model = BeamlineModel(cm1)
    energy = torch.tensor(model.energy_ev, dtype=DTYPE)
    bunching = _cavity(-30).first_order_transfer_map(energy, model.species)
    crest = _cavity(0).first_order_transfer_map(energy, model.species)
    # x' gained per unit x: positive (defocusing) for a bunching phase, zero on crest.
    assert float(bunching[1, 0]) > 0
    # On crest: no RF kick, only adiabatic damping of x' by p_in / p_out < 1.
    species = model.species
    p = lambda e: math.sqrt(e**2 - float(species.mass_eV) ** 2)  # noqa: E731
    e_out = model.energy_ev + float(_cavity(0).energy_gain(species))
    assert float(crest[1, 1]) == pytest.approx(p(model.energy_ev) / p(e_out), rel=1e-12)
    assert float(crest[1, 0]) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", LATTICES)
def test_bpm_readings_are_linear_in_corrector_kicks(name):
    lattice = load_lattice(name)
    model = BeamlineModel(lattice)
    errors = load_error_model("hard").draw(lattice, np.random.default_rng(3), 1)
    rng = np.random.default_rng(4)
    m1, m2 = rng.uniform(-5, 5, (2, lattice.n_correctors))
    a = 0.3
    settings = np.stack([m1, m2, a * m1 + (1 - a) * m2, 2 * m1])[None]
    b = model.track(errors, settings).bpm_mm[0].flatten(-2).numpy()
    b0 = model.track(errors, np.zeros((1, 1, lattice.n_correctors))).bpm_mm[0, 0].flatten().numpy()
    np.testing.assert_allclose(b[2], a * b[0] + (1 - a) * b[1], atol=1e-9)
    np.testing.assert_allclose(b[3] - b0, 2 * (b[0] - b0), atol=1e-9)
    assert np.abs(b[0] - b0).max() > 0.1  # kicks of a few units move the orbit visibly


@pytest.mark.parametrize("name", LATTICES)
def test_fast_response_model_equals_cheetah_tracking(name):
    lattice = load_lattice(name)
    model = BeamlineModel(lattice)
    errors = load_error_model("hard").model_copy(update={"beam_offset_mm": 1.0, "beam_angle_mrad": 1.0}).draw(
        lattice, np.random.default_rng(11), 4)
    response = model.response(errors)
    settings = np.random.default_rng(12).uniform(-10, 10, (4, lattice.n_correctors))
    tracked = model.track(errors, settings[:, None, :])
    np.testing.assert_allclose(response.readings(settings), tracked.bpm_mm[:, 0].flatten(-2).numpy(), atol=1e-9)
    ap = tracked.aperture_mm[:, 0]
    np.testing.assert_array_equal(
        response.beam_lost(settings), (torch.hypot(ap[..., 0], ap[..., 1]).numpy() > model.aperture_radius_mm).any(1))


def test_misalignment_moves_the_orbit_and_nominal_machine_is_centred(cm1):
    model = BeamlineModel(cm1)
    nominal = model.response(MachineErrors.nominal(cm1))
    np.testing.assert_allclose(nominal.b0, 0.0, atol=1e-12)
    errors = MachineErrors.nominal(cm1)
    errors.solenoid_offset_mm[0, 0] = [1.0, 0.0]
    shifted = model.response(errors)
    assert np.abs(shifted.b0).max() > 0.1
    # Misalignments shift the orbit but do not change the response matrix.
    np.testing.assert_allclose(shifted.r, nominal.r, atol=1e-12)


def test_train_preset_starting_orbit_matches_the_paper():
    """Calibration documented in the README: RMS ~0.5-8 mm, median a few mm, no loss."""
    for name in LATTICES:
        lattice = load_lattice(name)
        errors = load_error_model("train").draw(lattice, np.random.default_rng(0), 500)
        response = BeamlineModel(lattice).response(errors)
        rms = np.sqrt((response.b0**2).mean(axis=1))
        assert 0.3 < np.percentile(rms, 1) and np.percentile(rms, 99) < 8.0
        assert 1.5 < np.median(rms) < 5.0
        assert not response.beam_lost(np.zeros((500, lattice.n_correctors))).any()


def test_energy_gain_through_cheetah_equals_thin_gap_sum(cm1):
    """Cheetah tracking carries our gaps' energy gain: 1.356 -> ~2.01 MeV/u for cafe2-cm1."""
    model = BeamlineModel(cm1)
    errors = MachineErrors.nominal(cm1)
    segment = model.segment(errors, torch.zeros(1, 1, cm1.n_correctors, dtype=DTYPE))
    out = segment.track(model.incoming_beam(errors))
    kinetic_per_u = (float(out.energy) / 1e6 - cm1.species.mass_mev) / cm1.species.mass_number
    assert kinetic_per_u == pytest.approx(model.exit_energy_mev_per_u(), rel=1e-12)
    assert kinetic_per_u == pytest.approx(2.01, abs=0.01)
