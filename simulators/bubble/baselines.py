"""Linear theory: the amplitude ratio whose time-averaged primary Bjerknes force has its
equilibrium at the target, held constant.

Linearised Keller-Miksis (``R = R0 (1 + eps)``): ``M eps'' + C eps' + (K/rho) eps =
-p_A/rho`` with ``K = 3 gamma p_G0 - 2 sigma/R0``, ``M = R0^2 + 4 mu R0/(rho c)``, ``C =
4 mu/rho + R0 K/(rho c)``, so ``eps = chi p_A`` with ``chi = -(1/rho) / (K/rho - M
omega^2 + i C omega)``. The time average of ``F_B1 = -(4/3) pi R^3 dp_A/dx`` to first
order is ``<F_i> = -pi R0^3 k_i P_i^2 sin(2 k_i x) Re(chi_i)``: below resonance
(``Re chi < 0``) it pushes the bubble towards the pressure antinodes. The two forces
cancel at ``x_T`` when ``P1^2 / P2^2 = -Re(chi_2) k_2 sin(2 k_2 x_T) / (Re(chi_1) k_1
sin(2 k_1 x_T))``; where that is not positive linear theory has no equilibrium at the
target and drives the single frequency whose stable point is nearest to it.
"""

from __future__ import annotations

import math

import numpy as np

from .model import Drive, Liquid


def susceptibility(r0_m: float, omega: float, liquid: Liquid | None = None) -> complex:
    """Relative radius response per Pa of driving pressure (complex, linear theory)."""
    liq = liquid or Liquid()
    pg0 = liq.p0 - liq.pv + 2 * liq.sigma / r0_m
    stiffness = 3 * liq.gamma * pg0 - 2 * liq.sigma / r0_m
    mass = r0_m ** 2 + 4 * liq.mu * r0_m / (liq.rho * liq.c)
    damping = 4 * liq.mu / liq.rho + r0_m * stiffness / (liq.rho * liq.c)
    return -(1 / liq.rho) / complex(stiffness / liq.rho - mass * omega ** 2, damping * omega)


def mean_force_coefficients(r0_m: float, x: float, liquid: Liquid | None = None, drive: Drive | None = None) -> np.ndarray:
    """<F_i> / P_i^2 at x / lambda0 = `x` for both frequencies (N / Pa^2)."""
    liq, drv = liquid or Liquid(), drive or Drive()
    out = []
    for f in (drv.f1_hz, drv.f2_hz):
        omega = 2 * math.pi * f
        k = omega / liq.c
        x_m = x * liq.c / drv.f1_hz
        out.append(-math.pi * r0_m ** 3 * k * math.sin(2 * k * x_m) * susceptibility(r0_m, omega, liq).real)
    return np.array(out)


def linear_theory_amplitudes(target: float, r0_m: float = 60e-6, level_bar: float = 0.5,
                             liquid: Liquid | None = None, drive: Drive | None = None) -> np.ndarray:
    """(P1, P2) in bar, the larger one at `level_bar`, whose mean force vanishes at `target`."""
    a1, a2 = mean_force_coefficients(r0_m, target, liquid, drive)
    if a1 * a2 < 0:  # opposite pushes: they balance at P1^2 a1 + P2^2 a2 = 0
        ratio = math.sqrt(-a2 / a1)  # P1 / P2
        p1, p2 = (level_bar, level_bar / ratio) if ratio >= 1 else (level_bar * ratio, level_bar)
        return np.array([p1, p2])
    # No equilibrium at the target: the single frequency whose stable point is nearest.
    stable = {0: 0.25, 1: 0.125}  # antinodes (below resonance) in [0.05, 0.25]
    best = min(stable, key=lambda i: abs(stable[i] - target))
    amps = np.zeros(2)
    amps[best] = level_bar
    return amps


LINEAR_LEVEL_BAR = 0.2  # the larger amplitude; best of 0.05-0.5 bar on training bubbles (benchmarks/bubble.py)
PARKED = -1  # a bubble that reached its target is not integrated further


def run_linear_theory(r0_m: np.ndarray, starts: np.ndarray, targets: np.ndarray, scales: np.ndarray,
                      nominal_r0_m: float, horizon: int, tolerance: float, level_bar: float = LINEAR_LEVEL_BAR,
                      drive: Drive | None = None, cycles_per_step: float = 10.0, record: int = 0) -> dict:
    """Linear theory on a batch of bubbles (true `r0_m`, amplitude calibration `scales`),
    its amplitudes computed for the nominal bubble: steps to target (-1: not within
    `horizon`), final distance, solver failures, and the first `record` trajectories."""
    from .model import BubbleBatch

    n = len(starts)
    amps = np.array([linear_theory_amplitudes(float(t), nominal_r0_m, level_bar, drive=drive) for t in targets])
    batch = BubbleBatch(np.asarray(r0_m, dtype=float), np.asarray(starts, dtype=float), drive=drive)
    pa = amps * 1e5 * np.asarray(scales, dtype=float)[:, None]
    reached = np.full(n, -1)
    at_reach = np.zeros(n)
    trajectories = [[float(s)] for s in starts[:record]]
    for step in range(1, horizon + 1):
        batch.advance(pa, cycles_per_step)
        x = batch.position
        for i in range(min(record, n)):
            if reached[i] < 0 and batch.status[i] == 0:
                trajectories[i].append(float(x[i]))
        newly = (np.abs(x - targets) < tolerance) & (reached < 0) & (batch.status == 0)
        reached[newly] = step
        at_reach[newly] = np.abs(x - targets)[newly]
        batch.status[newly & (np.arange(n) >= record)] = PARKED
        if np.all((reached > 0) | (batch.status > 0)):
            break
    # A bubble integrated on after reaching its target (a recorded one, for the plot) does not
    # count a later solver failure: which bubbles are recorded must not change the numbers.
    failed = (batch.status > 0) & (reached < 0)
    final = np.where(reached > 0, at_reach, np.abs(batch.position - targets))
    return {"steps": reached, "final_distance": final, "solver_failures": failed,
            "amplitudes_bar": amps, "trajectories": trajectories}


class GreedyOneStep:
    """A greedy one-step controller on the model: each step it simulates every amplitude
    pair of a `grid` x `grid` lattice over [0, max] bar for one control interval from the
    imaged position (the nominal bubble, at rest: the radial transients decay within the
    interval) and applies the pair that lands nearest the target. Acts on the task's
    observation like a policy (``act(obs)`` -> action in [-1, 1]^2)."""

    def __init__(self, nominal_r0_m: float, drive: Drive | None = None, grid: int = 5, position_scale: float = 4.0,
                 amplitude_max_bar: float = 1.0, cycles: float = 10.0):
        levels = np.linspace(0.0, amplitude_max_bar, grid)
        self.candidates = np.array([(a, b) for a in levels for b in levels])
        self.r0, self.drive, self.scale, self.cycles = nominal_r0_m, drive, position_scale, cycles
        self.amplitude_max = amplitude_max_bar
        self.metadata = {"task": "bubble", "task_config": {}}

    def begin(self) -> None:
        """Stateless between episodes."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        from .model import BubbleBatch

        target, position = float(obs[0]) / self.scale, float(obs[1]) / self.scale
        n = len(self.candidates)
        batch = BubbleBatch(np.full(n, self.r0), np.full(n, position), drive=self.drive)
        batch.advance(self.candidates * 1e5, self.cycles)
        miss = np.where(batch.status == 0, np.abs(batch.position - target), np.inf)
        best = self.candidates[int(np.argmin(miss))]
        return best / self.amplitude_max * 2.0 - 1.0
