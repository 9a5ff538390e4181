"""Orbit correction as a registered task (``tbsac train orbit``, machine files ``task: orbit``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.plant import KnobSpec, ReadingSpec, knob_bounds, knob_steps
from core.task import EpisodeResult, TaskDefinition, concat_parts

from .errors import load_error_model, preset_names
from .lattice import Lattice, load_lattice, shipped_lattices
from .plant import OrbitSimPlant
from .task import OrbitTask, OrbitTaskConfig, rms_metric

# The virtual cryomodules' wiring (as 'measured'): 1.85 A per simulator unit, like the
# machine in the TBSAC paper, with every third corrector (from the second) reversed.
AMPS_PER_UNIT = 1.85


def nominal_response(lattice: Lattice):
    """Orbit response (mm per unit) of the lattice as its file describes it."""
    from .errors import MachineErrors
    from .model import BeamlineModel

    return BeamlineModel(lattice).response(MachineErrors.nominal(lattice)).r[0]


def corrector_polarity(index: int) -> int:
    """Wiring polarity of corrector `index` on the virtual machines."""
    return -1 if index % 3 == 1 else 1


@dataclass
class OrbitBar:
    """The acceptance bar a checkpoint must meet."""

    success_rate: float = 0.99
    final_rms_p95_mm: float = 0.5
    median_steps: float = 6.0

    def met(self, summary: dict) -> bool:
        p95 = summary["final_rms_mm"]["p95"]
        return (
            summary["success_rate"] >= self.success_rate
            and p95 is not None and p95 <= self.final_rms_p95_mm
            and summary["steps"]["median"] <= self.median_steps
        )


class OrbitDefinition(TaskDefinition):
    """Orbit correction of a cryomodule: correctors as knobs, BPM x/y readings in mm."""

    name = "orbit"
    description = "orbit correction of a superconducting cryomodule (steering correctors, BPMs)"
    metrics = (rms_metric(0.5),)
    default_arch = "tbsac"
    architectures = ("tbsac", "mlp")
    train_defaults = {"steps": 20_000, "eval_every": 1000, "eval_episodes": 100}
    baselines = ("svd_model", "svd_measured", "nothing")
    default_baselines = baselines
    sim_interlocks = [{"name": "beam_current", "rule": "min_fraction_of_start", "threshold": 0.8}]
    summary_keys = ("success_rate", "final_rms_mm", "steps", "initial_rms_mm", "beam_lost")
    scalars = {"eval/success_rate": ("success_rate",), "eval/median_steps": ("steps", "median"),
               "eval/final_rms_p95_mm": ("final_rms_mm", "p95")}
    eval_seed_base = 5_000_000
    foreign_errors = "foreign"

    def shipped_setups(self) -> list[str]:
        return shipped_lattices()

    def load_setup(self, name_or_path):
        return load_lattice(name_or_path)

    def error_presets(self) -> list[str]:
        return preset_names()

    def load_errors(self, name_or_path):
        return load_error_model(name_or_path)

    def sim_plant(self, setup: Lattice, errors) -> OrbitSimPlant:
        return OrbitSimPlant(setup, errors)

    def config_model(self) -> type:
        return OrbitTaskConfig

    def make_task(self, setup, knobs: list[KnobSpec], readings: list[ReadingSpec], config: OrbitTaskConfig) -> OrbitTask:
        return OrbitTask(len(readings), *knob_bounds(knobs), config, knob_step=knob_steps(knobs))

    def policy_metadata(self, setup: Lattice, errors, config: OrbitTaskConfig, task: OrbitTask) -> dict:
        return {
            "lattice": setup.fingerprint(),
            "observation": {"size": 3 * setup.n_readings, "layout": "[dB_{t-1}, dB_t, B_t], each over readings in mm",
                            "readings": setup.reading_names},
            "action": {"size": setup.n_correctors, "scale": config.action_scale, "unit": "simulator units per step"},
            # What the policy's lattice predicts (the mismatch guard compares the machine with it).
            "response": {"matrix": nominal_response(setup).round(6).tolist(), "unit": "mm per simulator unit"},
        }

    def expected_response(self, metadata: dict) -> dict | None:
        from .errors import ErrorModel

        try:
            trained_on = ErrorModel.model_validate(metadata.get("error_model", {}))
        except ValueError:
            trained_on = None
        if trained_on is not None and trained_on.differs_from_lattice:
            return None  # trained for a whole family of optics (e.g. `broad`): no single model to compare with
        matrix = metadata.get("response", {}).get("matrix")
        if matrix is None:  # policies trained before the response was recorded: their shipped lattice
            name = metadata.get("lattice", {}).get("name")
            if name not in shipped_lattices():
                return None
            matrix = nominal_response(load_lattice(name)).tolist()
        return {"matrix": matrix, "noise": float(metadata.get("error_model", {}).get("bpm_noise_mm", 0.05))}

    def setup_response(self, setup: Lattice):
        return nominal_response(setup)

    def check_policy(self, metadata: dict, setup: Lattice) -> str | None:
        trained, mine = metadata.get("lattice", {}), setup.fingerprint()
        for key, what in (("n_bpm", "BPMs"), ("n_correctors", "correctors")):
            if trained.get(key) != mine[key]:
                return (f"field 'metadata.lattice.{key}': policy was trained for {trained.get(key)} {what} "
                        f"({trained.get('name')}), lattice {setup.name} has {mine[key]}")
        for key in ("bpm_names", "corrector_names"):
            if trained.get(key) != mine[key]:
                return f"field 'metadata.lattice.{key}': policy expects {trained.get(key)}, lattice {setup.name} has {mine[key]}"
        return None

    # -- evaluation ------------------------------------------------------------------------
    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        from .evaluation import summarise

        return summarise(episodes)

    def score(self, summary: dict) -> tuple:
        """Success first, then fewer steps, then lower RMS."""
        return (summary["success_rate"], -summary["steps"]["median"], -(summary["final_rms_mm"]["p95"] or 1e9))

    def bar_met(self, summary: dict) -> bool:
        return OrbitBar().met(summary)

    def _eval_config(self, agent, budget) -> OrbitTaskConfig:
        config = OrbitTaskConfig.model_validate(agent.metadata.get("task_config", {}) if agent else {})
        return config.model_copy(update={"max_steps": budget}) if budget else config

    def evaluate_part(self, setup, errors, agent, seeds, methods, budget=None, **extra):
        from .evaluation import METHODS, orbit_runs

        return orbit_runs(setup, errors, agent, seeds, self._eval_config(agent, budget),
                          tuple(m for m in METHODS if m in methods or m == "agent"))

    def merge_evaluation(self, setup, errors, agent, parts, seed, methods, budget=None):
        from .evaluation import orbit_summary

        runs = concat_parts(parts)
        return orbit_summary(setup, errors, seed, runs), runs

    def results_table(self, summary: dict):
        columns = ["method", "success", "final RMS median (mm)", "final RMS p95 (mm)", "steps median", "steps p95",
                   "initial RMS median (mm)", "beam lost"]
        rows = [[name, f"{r['success_rate']:.0%}", str(r["final_rms_mm"]["median"]), str(r["final_rms_mm"]["p95"]),
                 str(r["steps"]["median"]), str(r["steps"]["p95"]), str(r["initial_rms_mm"]["median"]), str(r["beam_lost"])]
                for name, r in summary["results"].items()]
        return columns, rows

    def plot_evaluation(self, setup, runs, path: Path, title: str) -> Path:
        from .evaluation import plot_orbit_evaluation

        return plot_orbit_evaluation(setup, runs, path, title)

    # -- machines ------------------------------------------------------------------------------
    def panels(self, setup: Lattice) -> list[dict]:
        from .evaluation import bpm_positions

        positions = [round(float(s), 5) for s in bpm_positions(setup) for _ in ("x", "y")]
        return [{"kind": "profile", "title": "Orbit", "positions": positions, "position_title": "position s (m)",
                 "groups": [p for _ in setup.bpm_names for p in ("x", "y")], "value_title": "beam offset (mm)",
                 "band_metric": "rms_mm", "band_config": "target_rms_mm", "caption": "orbit per plane; green band: target"}]

    def calibrate(self, setup: Lattice, measurement: dict, out: Path) -> dict:
        import json

        import numpy as np
        import yaml

        from core.config import ConfigError

        from .calibration import calibrated_lattice, fit_response, plot_columns, report_markdown

        for field, mine in (("knobs", setup.corrector_names), ("readings", setup.reading_names)):
            if measurement.get(field) != mine:
                raise ConfigError(f"measurement field '{field}': {measurement.get(field)} do not match lattice {setup.name} {mine}")
        if measurement.get("status") != "completed":
            raise ConfigError(f"measurement status is {measurement.get('status')!r}: only a completed measurement can be fitted")
        measured = np.array(measurement["matrix"], dtype=float)
        sigma = np.array(measurement["sigma"], dtype=float)
        if not np.all(np.isfinite(measured)):
            raise ConfigError("measurement field 'matrix': contains missing or non-finite values")
        cal = fit_response(setup, measured, sigma)
        # One machine-file unit of knob j moves it by kick_scale[j] nominal kicks, i.e.
        # kick_scale[j] / unit_scale[j] calibrated units.
        factors = [k / u for k, u in zip(cal.kick_scale, cal.unit_scale)]
        dead = [n for n, k, s in zip(setup.corrector_names, cal.kick_scale, cal.uncertainty["kick_scale"])
                if abs(k) < max(3 * s, 1e-3)]
        if dead:
            cal.good = False
            cal.verdict = (f"BAD FIT: no measurable effect of {', '.join(dead)} (dead, disconnected or mis-named): "
                           "do not use the calibrated files; " + cal.verdict)
        lattice = calibrated_lattice(setup, cal)
        out.mkdir(parents=True, exist_ok=True)
        setup_file = out / "lattice.yaml"
        header = (f"# {lattice.name}: fitted by `tbsac calibrate` to a measured response.\n# {cal.verdict}\n"
                  "# Corrector units are calibrated units (corrector_kick_scale); the machine file's scales map them to amperes.\n")
        setup_file.write_text(header + yaml.safe_dump(lattice.model_dump(mode="json", exclude_defaults=False), sort_keys=False))
        plot = plot_columns(measured, sigma, np.array(cal.model_matrix), setup.corrector_names, setup.reading_names,
                            out / "response.png", f"{setup.name}: measured vs calibrated model ({cal.verdict.split(':')[0]})")
        report = {"lattice": setup.name, "calibrated_lattice": lattice.name, **cal.as_dict(),
                  "parameters": {"solenoids": [e.name for e in setup.elements if e.type == "solenoid"],
                                 "drifts": [e.name for e in setup.elements if e.type == "drift"],
                                 "bpms": setup.bpm_names, "correctors": setup.corrector_names},
                  "noise_per_reading": measurement.get("noise"), "plot": str(plot)}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return {"setup_file": setup_file, "knob_factors": factors, "good": cal.good, "verdict": cal.verdict,
                "report": report, "markdown": report_markdown(report)}

    def wiring(self, setup: Lattice, knobs: list[KnobSpec]) -> tuple[list[float], str]:
        return [AMPS_PER_UNIT * corrector_polarity(i) for i in range(len(knobs))], "A"
