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
