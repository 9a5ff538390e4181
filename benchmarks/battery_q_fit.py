"""Battery diagnostic (issue 15): can a critic network hold the optimal action values
precisely enough to act on them?

    python benchmarks/battery_q_fit.py [--days 450] [--width 64] [--depth 2] [--epochs 60]
                                       [--eval-days 30] [--seed 0] [--actor-observation]

An actor-critic's policy is only as good as its critic's ranking of actions. Here the
critic gets the best possible teacher instead of TD targets: every label is the SDP
table's exact expected value of an action (the negative of its regret against the
table's best power, in reward units: x the task's reward scale), so no label has noise.

1. States: `--days` training days traded by the SDP with exploration (a uniform random
   power in 20 % of the periods, the SDP's plus N(0, 0.15) otherwise). Each state is
   labelled for 8 actions: the SDP's own and 7 uniform ones, each valued at the power
   the battery would actually deliver (ramp, SoC and cycle limits).
2. Fit: an MLP of the critics' input (the training observation with its privileged
   features, and the action; with `--actor-observation` the actor's observation and the
   action, as a plain critic reads) by mean squared error; the last 10 % of the days are
   held out.
3. Act: the greedy policy of the fitted Q (41 actions) on the `--eval-days` days that
   training evaluates on, beside the SDP and the MPC on the same days.

Prints one JSON line per third of the epochs. A diagnostic, not a method: nothing here is
shipped or used by the agent.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn

from core.task import TaskEnv
from simulators.battery.definition import BatteryDefinition, training_value_table
from simulators.battery.task import PRESETS, BatterySimPlant

ACTIONS_PER_STATE = 8
GREEDY_ACTIONS = torch.linspace(-1.0, 1.0, 41)


def training_environment(definition, setup, preset: str):
    """The battery's training environment with SDP shaping and privileged features."""
    config = definition.config_model()(shaping_potential="sdp", shaping_gamma=1.0)
    plant = BatterySimPlant(setup, PRESETS[preset])
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    return TaskEnv(plant, task, privileged=True), plant, task, config


def labelled_states(definition, setup, table, days: int, seed: int):
    """(observations, actions, labels): each visited state with 8 actions and their exact value."""
    env, plant, _, config = training_environment(definition, setup, "train")
    rng = np.random.default_rng(seed)
    observations, actions, labels = [], [], []
    for day in range(days):
        obs, _ = env.reset(seed=1_000_000 + seed * 10_000 + day)
        done = False
        while not done:
            battery = plant.battery.state  # what the SDP's state is made of, read from the simulator
            state = (plant.period, plant.settled_price(), battery.soc * setup.capacity_mwh, battery.discharged_today_mwh,
                     battery.power_mw)
            best = table.decide(*state) / setup.power_mw
            tried = np.concatenate([[best], rng.uniform(-1.0, 1.0, ACTIONS_PER_STATE - 1)])
            delivered = [plant.battery.feasible_power(float(a) * setup.power_mw) for a in tried]
            observations += [obs] * len(tried)
            actions += tried.tolist()
            labels += (-config.reward_scale * table.regrets(*state, delivered)).tolist()
            act = rng.uniform(-1.0, 1.0) if rng.random() < 0.2 else float(np.clip(best + rng.normal(0, 0.15), -1, 1))
            obs, _, terminated, truncated, _ = env.step(np.array([act], dtype=np.float32))
            done = terminated or truncated
    x = torch.as_tensor(np.array(observations, dtype=np.float32))
    a = torch.as_tensor(np.array(actions, dtype=np.float32))[:, None]
    return torch.cat([x, a], 1), torch.as_tensor(np.array(labels, dtype=np.float32))[:, None]


class KeepColumns(nn.Module):
    """The input without the privileged features (the columns before the action that follow
    the actor's observation): a plain critic's input from a privileged one's."""

    def __init__(self, actor_observation_size: int, privileged_size: int):
        super().__init__()
        self.actor_size, self.privileged_size = actor_observation_size, privileged_size

    def forward(self, observation_action: torch.Tensor) -> torch.Tensor:
        return torch.cat([observation_action[:, :self.actor_size],
                          observation_action[:, self.actor_size + self.privileged_size:]], 1)


def greedy_profit(q: nn.Module, definition, setup, days: int) -> float:
    """Profit (EUR) of acting greedily on `q` over the training evaluation's days."""
    env, _, task, _ = training_environment(definition, setup, "test")
    total = 0.0
    for i in range(days):
        obs, _ = env.reset(seed=definition.eval_seed_base + i)
        done = False
        while not done:
            with torch.no_grad():
                values = q(torch.cat([torch.as_tensor(obs).repeat(len(GREEDY_ACTIONS), 1), GREEDY_ACTIONS[:, None]], 1))
            action = float(GREEDY_ACTIONS[int(values[:, 0].argmax())])
            obs, _, terminated, truncated, _ = env.step(np.array([action], dtype=np.float32))
            done = terminated or truncated
        total += task.profit
    return total


def planner_profits(definition, setup, days: int) -> dict:
    """The SDP's and the MPC's profit (EUR) on the same days, for scale."""
    seeds = [definition.eval_seed_base + i for i in range(days)]
    runs = definition.evaluate_part(setup, PRESETS["test"], None, seeds, ("sdp", "mpc"))
    return {name: sum(day["profit_eur"] for day in runs[name]) for name in ("sdp", "mpc")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=450)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actor-observation", action="store_true",
                        help="the critic reads the actor's observation and the action, not the privileged features")
    args = parser.parse_args(argv)
    for name, least in (("days", 10), ("width", 1), ("depth", 1), ("epochs", 1), ("eval_days", 1)):
        if getattr(args, name) < least:  # 10 days: a tenth of them, at least one, is held out
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    definition = BatteryDefinition()
    setup = definition.load_setup("bess-1mw-2mwh")
    table = training_value_table(setup.model_dump_json())
    started = time.time()
    xa, y = labelled_states(definition, setup, table, args.days, args.seed)
    cut = int(0.9 * args.days) * 96 * ACTIONS_PER_STATE  # whole days held out
    held_x, held_y, xa, y = xa[cut:], y[cut:], xa[:cut], y[:cut]
    print(json.dumps({"labelled": len(xa), "held_out": len(held_x), "label_var": float(y.var()),
                      "seconds": round(time.time() - started)}), flush=True)
    layers, width_in = [], xa.shape[1]
    if args.actor_observation:
        _, _, task, _ = training_environment(definition, setup, "train")
        layers = [KeepColumns(task.observation_space.shape[0], task.privileged_size)]
        width_in -= task.privileged_size
    for _ in range(args.depth):
        layers += [nn.Linear(width_in, args.width), nn.ReLU()]
        width_in = args.width
    q = nn.Sequential(*layers, nn.Linear(width_in, 1))
    optimiser = torch.optim.Adam(q.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.epochs)
    planners = planner_profits(definition, setup, args.eval_days)
    for epoch in range(1, args.epochs + 1):
        order, total = torch.randperm(len(xa)), 0.0
        for i in range(0, len(xa), 1024):
            batch = order[i:i + 1024]
            loss = ((q(xa[batch]) - y[batch]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        schedule.step()
        if epoch % max(args.epochs // 3, 1) == 0:
            with torch.no_grad():
                held = float(((q(held_x) - held_y) ** 2).mean())
            critic_input = "actor" if args.actor_observation else "privileged"
            print(json.dumps({"net": f"{args.depth}x{args.width}", "input": critic_input, "epoch": epoch,
                              "mse": round(total / len(xa), 5), "held_out_mse": round(held, 5),
                              "greedy_profit_eur": round(greedy_profit(q, definition, setup, args.eval_days)),
                              **{f"{k}_profit_eur": round(v) for k, v in planners.items()}}), flush=True)


if __name__ == "__main__":
    main()
