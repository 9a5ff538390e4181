"""Orbit-correction benchmarks: speed of the simulator, trainer and policy, and the
evaluation table of the shipped agents against the baselines.

    python benchmarks/orbit.py [--episodes 100] [--out benchmarks/results]

Writes ``orbit.json`` and ``orbit.md`` in the output directory. Numbers depend on the
machine; they are measurements, not test assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from controller.agents import make_sac
from controller.policy import Policy
from core.registry import get_task
from simulators.beamline.errors import load_error_model
from simulators.beamline.evaluation import evaluate_orbit
from simulators.beamline.lattice import load_lattice
from simulators.beamline.task import BatchedOrbitEnv, OrbitEnv, OrbitTaskConfig

LATTICES = ("cafe2-cm1", "cafe2-cm2", "cafe2-cm3")


def env_steps_per_second(lattice, em, steps: int = 20_000) -> float:
    env = OrbitEnv(lattice, em)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.2, 0.2, (steps, lattice.n_correctors))
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def batched_steps_per_second(lattice, em, n_envs: int = 256, rounds: int = 400) -> float:
    env = BatchedOrbitEnv(lattice, em, n_envs, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(rounds):
        env.step(rng.uniform(-0.2, 0.2, (n_envs, lattice.n_correctors)))
    return n_envs * rounds / (time.perf_counter() - start)


def sac_steps_per_second(lattice, em, steps: int = 3000) -> float:
    torch.set_num_threads(1)
    model = make_sac(OrbitEnv(lattice, em), seed=0, learning_starts=0)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    return steps / (time.perf_counter() - start)


def inference_latency_us(policy: Policy, n_obs: int, repeats: int = 2000) -> float:
    obs = np.random.default_rng(0).normal(size=(repeats, n_obs)).astype(np.float32)
    times = []
    for o in obs:
        t = time.perf_counter()
        policy.act(o)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    cm1 = load_lattice("cafe2-cm1")
    train = load_error_model("train")
    policy = Policy.load("pretrained", get_task("orbit"), cm1)
    speed = {
        "env_steps_per_s_single": round(env_steps_per_second(cm1, train)),
        "env_steps_per_s_batched_256": round(batched_steps_per_second(cm1, train)),
        "sac_train_steps_per_s": round(sac_steps_per_second(cm1, train), 1),
        "policy_inference_us_median": round(inference_latency_us(policy, 3 * cm1.n_readings), 1),
    }
    print(json.dumps(speed))
    evaluations = []
    for name in LATTICES:
        lattice = load_lattice(name)
        agent = Policy.load("pretrained", get_task("orbit"), lattice)
        config = OrbitTaskConfig(**agent.metadata["task_config"])
        for errors in ("test", "hard"):
            summary, _ = evaluate_orbit(lattice, load_error_model(errors), agent, args.episodes, args.seed, config)
            evaluations.append(summary)
            print(json.dumps(summary))
    report = {
        "machine": {"python": platform.python_version(), "cpu_count": torch.get_num_threads(), "platform": platform.platform()},
        "speed": speed,
        "evaluations": evaluations,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "orbit.json").write_text(json.dumps(report, indent=2))
    lines = ["# Orbit-correction benchmarks", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in speed.items()]
    lines += ["", f"Evaluation: {args.episodes} machines from seed {args.seed}.", "",
              "| lattice | errors | method | success | final RMS median (mm) | final RMS p95 (mm) | steps median | steps p95 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in evaluations:
        for method, r in s["results"].items():
            lines.append(
                f"| {s['lattice']} | {s['errors']} | {method} | {r['success_rate']:.2f} | {r['final_rms_mm']['median']} "
                f"| {r['final_rms_mm']['p95']} | {r['steps']['median']} | {r['steps']['p95']} |")
    (args.out / "orbit.md").write_text("\n".join(lines) + "\n")
    print(f"written {args.out / 'orbit.json'} and {args.out / 'orbit.md'}")


if __name__ == "__main__":
    main()
