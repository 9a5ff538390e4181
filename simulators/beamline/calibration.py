"""Fitting a lattice to a measured orbit response, through Cheetah's differentiable tracking.

The linear orbit response of a cryomodule does not depend on misalignments (they only
move the orbit), so a measured response matrix pins down the *optics*: per-solenoid
field scale, RF defocusing, drift lengths (element positions), BPM gains and
rotations, and each corrector's kick per unit including its sign. LOCO-style fit:

    R_meas[i, j] ~ k_j * M_ij(theta)

with ``M(theta)`` the model response to a unit nominal kick (Cheetah, batched and
differentiable) and the kicks ``k_j`` solved in closed form for every theta (variable
projection: the fit only searches the optics). Weighted by the measurement's standard
errors, with weak priors on what the measurement cannot separate (a common BPM gain is
indistinguishable from a common kick scale; drift lengths trade against solenoid
strength). Multi-start: a grid over the module-wide solenoid and defocusing scales,
the best starts refined by L-BFGS. Uncertainties from the Jacobian at the optimum.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MachineErrors
from .lattice import Bpm, Cavity, Drift, Lattice, Solenoid
from .model import DTYPE, BeamlineModel

# Prior widths (one sigma) of what the response alone cannot separate well.
PRIOR = {"log_solenoid": 1.0, "log_defocus": 0.7, "drift_mm": 30.0, "log_bpm_gain": 0.03, "bpm_rotation_mrad": 15.0}
GRID_SOLENOID = np.exp(np.linspace(np.log(0.35), np.log(3.2), 19))
GRID_DEFOCUS = (0.5, 1.0, 2.0)
STARTS = 4
BAD_FIT_CHI2 = 4.0  # reduced chi^2 above this: residual twice the noise or worse


@dataclass
class Calibration:
    """Fitted parameters, their one-sigma uncertainties and the fit quality."""

    solenoid_scale: list[float]
    defocus_scale: float
    drift_delta_mm: list[float]
    bpm_gain: list[list[float]]  # per BPM (x, y)
    bpm_rotation_mrad: list[float]
    kick_scale: list[float]  # per corrector: kick per measured unit / nominal kick per unit (signed)
    unit_scale: list[float]  # per corrector: kick of one calibrated unit / nominal kick (orbit effect as nominal)
    uncertainty: dict  # same keys, one sigma
    chi2_reduced: float
    residual_per_reading: list[float]  # rms over knobs of (measured - model) / sigma
    model_matrix: list[list[float]]
    good: bool
    verdict: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Fit:
    """The model's response as a function of the optics parameters (batched starts)."""

    def __init__(self, lattice: Lattice, measured: np.ndarray, sigma: np.ndarray):
        self.lattice = lattice
        self.model = BeamlineModel(lattice)
        self.n_sol = sum(isinstance(e, Solenoid) for e in lattice.elements)
        self.n_cav = sum(isinstance(e, Cavity) for e in lattice.elements)
        self.n_drift = sum(isinstance(e, Drift) for e in lattice.elements)
        self.n_bpm = lattice.n_bpm
        self.measured = torch.as_tensor(measured, dtype=DTYPE)
        floor = 1e-3 * float(np.nanmax(np.abs(measured)))  # a perfect zero-noise measurement is still finite
        self.weight = 1.0 / torch.as_tensor(np.maximum(np.nan_to_num(sigma, nan=floor), floor), dtype=DTYPE)
        self.sizes = {"log_solenoid": self.n_sol, "log_defocus": 1, "drift_mm": self.n_drift,
                      "log_bpm_gain": 2 * self.n_bpm, "bpm_rotation_mrad": self.n_bpm}

    @property
    def n_params(self) -> int:
        return sum(self.sizes.values())

    def split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, size in self.sizes.items():
            out[name] = theta[:, i:i + size]
            i += size
        return out

    def unit_response(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, n_readings, n_correctors): response to one nominal unit of every corrector."""
        p = self.split(theta)
        batch = theta.shape[0]
        zeros = np.zeros
        errors = MachineErrors(
            solenoid_offset_mm=zeros((batch, self.n_sol, 2)), cavity_offset_mm=zeros((batch, self.n_cav, 2)),
            solenoid_scale=p["log_solenoid"].exp(), corrector_scale=np.ones((batch, self.lattice.n_correctors)),
            bpm_offset_mm=zeros((batch, self.n_bpm, 2)), beam_offset_mm=zeros((batch, 2)), beam_angle_mrad=zeros((batch, 2)),
            bpm_noise_mm=0.0, cavity_defocus=p["log_defocus"].exp().expand(batch, self.n_cav),
            drift_delta_mm=p["drift_mm"], bpm_gain=p["log_bpm_gain"].exp().reshape(batch, self.n_bpm, 2),
            bpm_rotation_mrad=p["bpm_rotation_mrad"],
        )
        return self.model.response_tensors(errors)[1]

    def kicks(self, unit: torch.Tensor) -> torch.Tensor:
        """Weighted least-squares kick per corrector for each start (closed form)."""
        w2 = self.weight.square()
        return (w2 * unit * self.measured).sum(-2) / (w2 * unit.square()).sum(-2).clamp_min(1e-30)

    def residuals(self, theta: torch.Tensor, kicks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_data + n_params): weighted data residuals, then the prior's."""
        unit = self.unit_response(theta)
        k = self.kicks(unit) if kicks is None else kicks
        data = ((self.measured - unit * k[:, None, :]) * self.weight).flatten(1)
        prior = torch.cat([v / PRIOR[name] for name, v in self.split(theta).items()], dim=1)
        return torch.cat([data, prior], dim=1)

    def initial(self) -> torch.Tensor:
        """Starts: the grid points with the lowest residual."""
        grid = [(s, d) for s in GRID_SOLENOID for d in GRID_DEFOCUS]
        theta = torch.zeros(len(grid), self.n_params, dtype=DTYPE)
        theta[:, : self.n_sol] = torch.tensor([math.log(s) for s, _ in grid], dtype=DTYPE)[:, None]
        theta[:, self.n_sol] = torch.tensor([math.log(d) for _, d in grid], dtype=DTYPE)
        with torch.no_grad():
            cost = self.residuals(theta).square().sum(1)
        return theta[torch.argsort(cost)[:STARTS]].clone()


def fit_response(lattice: Lattice, measured: np.ndarray, sigma: np.ndarray, iterations: int = 60, rounds: int = 3) -> Calibration:
    """Fit the lattice's optics and the correctors' kicks to a measured response (n_readings x n_correctors)."""
    fit = _Fit(lattice, np.asarray(measured, dtype=float), np.asarray(sigma, dtype=float))
    theta = fit.initial().requires_grad_(True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimiser.zero_grad()
        loss = fit.residuals(theta).square().sum()  # the starts are independent: a sum fits them all
        loss.backward()
        return loss

    for _ in range(rounds):
        optimiser.step(closure)
    with torch.no_grad():
        costs = fit.residuals(theta).square().sum(1)
    best = theta[int(torch.argmin(costs))].detach()[None]
    with torch.no_grad():
        unit = fit.unit_response(best)
        kicks = fit.kicks(unit)
        nominal = fit.unit_response(torch.zeros_like(best))
    # Calibrated units: one unit of every corrector moves the orbit as much (rms over the
    # readings) as one unit does on the lattice file, whatever the fitted optics: the
    # steps a policy was trained with keep their size.
    unit_scale = (nominal[0].norm(dim=0) / unit[0].norm(dim=0).clamp_min(1e-12)).numpy()
    # Uncertainties: Gauss-Newton covariance of (theta, kicks), scaled by the fit quality.
    full = torch.cat([best[0], kicks[0]])

    def residual_of(vector: torch.Tensor) -> torch.Tensor:
        return fit.residuals(vector[None, : fit.n_params], vector[None, fit.n_params:])[0]

    jac = torch.autograd.functional.jacobian(residual_of, full)
    n_data = fit.measured.numel()
    data_res = residual_of(full)[:n_data]
    dof = max(1, n_data - fit.lattice.n_correctors - fit.n_params)
    chi2 = float(data_res.square().sum()) / dof
    cov = torch.linalg.pinv(jac.T @ jac) * max(1.0, chi2)
    std = cov.diagonal().clamp_min(0).sqrt().numpy()
    model_matrix = (unit * kicks[:, None, :])[0].numpy()
    per_reading = np.sqrt(np.mean(np.square(data_res.detach().numpy().reshape(fit.measured.shape)), axis=1))
    p = {k: v[0].numpy() for k, v in fit.split(best).items()}
    s = {k: v[0] for k, v in fit.split(torch.as_tensor(std[None, : fit.n_params])).items()}
    sol = np.exp(p["log_solenoid"])
    good = chi2 <= BAD_FIT_CHI2
    verdict = (f"good fit: residual {math.sqrt(chi2):.2f} x the measurement noise (reduced chi^2 {chi2:.2f})" if good else
               f"BAD FIT: residual {math.sqrt(chi2):.1f} x the measurement noise (reduced chi^2 {chi2:.1f}); the lattice "
               "model cannot explain this machine's response (wrong lattice file, a dead or swapped corrector or BPM, "
               "or a non-linear machine): do not use the calibrated files")
    return Calibration(
        solenoid_scale=sol.tolist(), defocus_scale=float(np.exp(p["log_defocus"][0])), drift_delta_mm=p["drift_mm"].tolist(),
        bpm_gain=np.exp(p["log_bpm_gain"]).reshape(-1, 2).tolist(), bpm_rotation_mrad=p["bpm_rotation_mrad"].tolist(),
        kick_scale=kicks[0].numpy().tolist(), unit_scale=unit_scale.tolist(),
        uncertainty={"solenoid_scale": (sol * s["log_solenoid"].numpy()).tolist(),
                     "defocus_scale": float(np.exp(p["log_defocus"][0]) * s["log_defocus"][0]),
                     "drift_delta_mm": s["drift_mm"].numpy().tolist(),
                     "bpm_gain": (np.exp(p["log_bpm_gain"]) * s["log_bpm_gain"].numpy()).reshape(-1, 2).tolist(),
                     "bpm_rotation_mrad": s["bpm_rotation_mrad"].numpy().tolist(),
                     "kick_scale": std[fit.n_params:].tolist()},
        chi2_reduced=chi2, residual_per_reading=per_reading.tolist(), model_matrix=model_matrix.tolist(),
        good=good, verdict=verdict,
    )


def calibrated_lattice(lattice: Lattice, cal: Calibration) -> Lattice:
    """The lattice with the fitted optics; its corrector units are the calibrated ones
    (``unit_scale``); the machine file maps them to amperes with the fitted kicks."""
    common = float(np.median(cal.solenoid_scale))  # keeps every normalised field within its bounds
    elements, i_sol, i_drift, i_bpm = [], 0, 0, 0
    for e in lattice.elements:
        if isinstance(e, Solenoid):
            e = e.model_copy(update={"field": e.field * cal.solenoid_scale[i_sol] / common})
            i_sol += 1
        elif isinstance(e, Drift):
            e = e.model_copy(update={"length": max(0.0, e.length + cal.drift_delta_mm[i_drift] * 1e-3)})
            i_drift += 1
        elif isinstance(e, Cavity):
            e = e.model_copy(update={"defocus_scale": e.defocus_scale * cal.defocus_scale})
        elif isinstance(e, Bpm):
            gx, gy = cal.bpm_gain[i_bpm]
            e = e.model_copy(update={"gain_x": e.gain_x * gx, "gain_y": e.gain_y * gy,
                                     "rotation_mrad": e.rotation_mrad + cal.bpm_rotation_mrad[i_bpm]})
            i_bpm += 1
        elements.append(e)
    scales = {n: lattice.corrector_kick_scale.get(n, 1.0) * u for n, u in zip(lattice.corrector_names, cal.unit_scale)}
    return lattice.model_copy(update={
        "corrector_kick_scale": scales,
        "name": f"{lattice.name}-calibrated", "derived_from": lattice.derived_from or lattice.name,
        "description": f"{lattice.name} fitted to a measured response ({cal.verdict.split(':')[0]})",
        "solenoid_max_field_t": lattice.solenoid_max_field_t * common, "elements": elements})


def plot_columns(measured: np.ndarray, sigma: np.ndarray, model: np.ndarray, knobs: list[str], readings: list[str],
                 path: Path, title: str) -> Path:
    """Measured (points with error bars) against model (lines), one panel per knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(knobs)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    x = np.arange(len(readings))
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        ax.errorbar(x, measured[:, j], yerr=np.nan_to_num(sigma[:, j]), fmt="o", ms=3, label="measured")
        ax.plot(x, model[:, j], "-", label="calibrated model")
        ax.set_title(knobs[j], fontsize=9)
        ax.axhline(0, color="0.8", lw=0.5)
    for ax in axes[-1]:
        ax.set_xticks(x, readings, rotation=90, fontsize=6)
    axes[0][0].set_ylabel("response (mm / unit)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_markdown(report: dict) -> str:
    """The readable part of a calibration report: residual per reading against the
    measurement noise, every fitted parameter with its one-sigma uncertainty."""
    u = report["uncertainty"]
    p = report["parameters"]
    lines = ["## Residual per reading (rms over knobs, in units of the measurement's standard error; ~1 is noise)", "",
             "| reading | residual / sigma | reading noise |", "|---|---|---|"]
    readings = [f"{b}:{plane}" for b in p["bpms"] for plane in ("x", "y")]
    noise = report.get("noise_per_reading") or [None] * len(readings)
    for name, res, n in zip(readings, report["residual_per_reading"], noise):
        lines.append(f"| {name} | {res:.2f} | {n:.4g} |" if n is not None else f"| {name} | {res:.2f} | - |")
    lines += ["", "## Fitted parameters (one sigma)", "", "| parameter | value | sigma |", "|---|---|---|"]
    for i, name in enumerate(p["solenoids"]):
        lines.append(f"| {name} field scale | {report['solenoid_scale'][i]:.4f} | {u['solenoid_scale'][i]:.4f} |")
    lines.append(f"| RF defocusing scale | {report['defocus_scale']:.4f} | {u['defocus_scale']:.4f} |")
    for i, name in enumerate(p["correctors"]):
        lines.append(f"| {name} kick per machine-file unit (x nominal, signed) | {report['kick_scale'][i]:.4f} | "
                     f"{u['kick_scale'][i]:.4f} |")
    for i, name in enumerate(p["correctors"]):
        lines.append(f"| {name} kick per calibrated unit (x nominal) | {report['unit_scale'][i]:.4f} | - |")
    for i, name in enumerate(p["drifts"]):
        lines.append(f"| {name} length change (mm) | {report['drift_delta_mm'][i]:.1f} | {u['drift_delta_mm'][i]:.1f} |")
    for i, name in enumerate(p["bpms"]):
        gx, gy = report["bpm_gain"][i]
        lines.append(f"| {name} gain x, y | {gx:.4f}, {gy:.4f} | {u['bpm_gain'][i][0]:.4f}, {u['bpm_gain'][i][1]:.4f} |")
        lines.append(f"| {name} rotation (mrad) | {report['bpm_rotation_mrad'][i]:.2f} | {u['bpm_rotation_mrad'][i]:.2f} |")
    lines += ["", f"Measured vs model columns: {Path(report['plot']).name}", ""]
    return "\n".join(lines)
