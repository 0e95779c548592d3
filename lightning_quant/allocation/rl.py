"""Reinforcement-learning bit allocation: a DDPG agent, HAQ's layer-level agent, AutoQB's hierarchical agent, and
the episode loop with a budget that always holds.

Sources, and what is whose:

* **DDPG** (Lillicrap et al., ICLR 2016): an actor ``pi(s)`` and a critic ``Q(s, a)`` with slowly-following target
  copies (soft updates with rate ``tau``), trained from a replay buffer. HAQ (Wang, Liu, Lin, Lin, Han, "HAQ:
  Hardware-Aware Automated Quantization with Mixed Precision", CVPR 2019) uses it for bit allocation with: two
  hidden layers of 300 units for actor and critic, the critic adding its state and action branches in the first
  hidden layer, a sigmoid actor (actions in ``[0, 1]``), Adam with learning rates ``1e-4`` (actor) and ``1e-3``
  (critic), ``tau = 0.01``, batches of 64, 20 warm-up episodes of uniformly random actions, then exploration by a
  normal distribution truncated to ``[0, 1]`` around the actor's action whose standard deviation starts at 0.5 and
  decays by 0.99 per episode, a replay buffer of 128 episodes, every transition of an episode rewarded with the
  episode's final reward, the reward centred by a moving average of the sampled batch means (momentum 0.5), one
  update per transition, and the action mapped to a width by equal bins ``round(b_min - 0.5 + a (b_max - b_min +
  1))``. Those are this module's defaults (:class:`DDPGConfig`); its reward is HAQ's ``0.1 x (accuracy % - reference
  accuracy %)``, i.e. ``reward_scale = 10`` on accuracies in ``[0, 1]``. NNCF's AutoQ initializer uses the same agent
  layer-wise, with a state of layer descriptors and the previous action normalised column by column.
* **The hierarchy** is AutoQB/AutoQ's (Lou, Liu, Kim, Jiang, arXiv:1902.05690; ICLR 2020 as "AutoQ: Automated
  Kernel-Wise Neural Network Quantization"): a high-level agent picks, per layer, a *goal* -- the layer's average
  weight width -- (and the input width); a goal-conditioned low-level agent picks the width of each output channel
  (kernel), binary included; the low level gets an extrinsic reward (accuracy, hardware cost) and an intrinsic one
  for meeting its goal; states hold the layer and channel indices, channel counts, kernel size, stride, parameters,
  FLOPs and the previous action.
* **Ours**: the implementation; the intrinsic reward ``-|channel-weighted mean width - goal| / (b_max - b_min)``
  weighted by ``intrinsic_weight``; the extra per-channel state features (relative norm and magnitude of the
  channel's weights, :func:`~lightning_quant.allocation.units.unit_descriptors`); channel groups
  (``channels_per_unit``); ``discount = 0`` by default (every transition already receives the episode's final
  reward, so each step's critic learns the expected final reward of its action -- bootstrapping over a horizon of
  hundreds of channel steps would only add up later estimates; HAQ's ``discount = 1`` is available); the
  ``"relative"`` low level (the default): a unit's width is its layer's goal plus its action above the layer's mean
  action (times the width range), so the low level distributes the goal within the layer; the budget: every
  proposal is shifted onto the budget and rounded by the suite's budget-keeping solver
  (:meth:`~lightning_quant.allocation.units.AllocationProblem.project`), so **every episode's allocation meets the
  budget**, not only the final one; and a fully seeded search (one ``torch.Generator`` for exploration and replay
  sampling, networks initialised from the seed) whose whole state -- networks, optimizers, replay buffers, the
  generator, the best policy and the history -- is one state dict, so a killed search resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.allocation.units import AllocationProblem, Projection, normalize_columns
from lightning_quant.core.errors import QuantizationConfigError


@dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters of a DDPG agent (defaults: HAQ's, see the module docs; ``discount`` is ours).

    Args:
        hidden: units of each of the two hidden layers of actor and critic.
        actor_lr: Adam learning rate of the actor.
        critic_lr: Adam learning rate of the critic.
        tau: soft-update rate of the target networks.
        batch_size: transitions per update.
        discount: weight of the next state's value in the critic's target (0: each step's critic learns the
            episode's final reward of its action; HAQ uses 1).
        warmup_episodes: episodes of uniformly random actions before the actor acts (updates start after them).
        init_noise: standard deviation of the truncated-normal exploration at the first episode after warm-up.
        noise_decay: its decay per episode.
        buffer_episodes: the replay buffer holds this many episodes' transitions.
        baseline_momentum: momentum of the moving average of batch rewards subtracted from the rewards.
        updates_per_step: critic/actor updates per stored transition.
    """

    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    batch_size: int = 64
    discount: float = 0.0
    warmup_episodes: int = 20
    init_noise: float = 0.5
    noise_decay: float = 0.99
    buffer_episodes: int = 128
    baseline_momentum: float = 0.5
    updates_per_step: float = 1.0

    @classmethod
    def for_episodes(cls, episodes: int, **overrides: Any) -> DDPGConfig:
        """HAQ's hyper-parameters with its exploration schedule compressed to a search of ``episodes`` episodes.

        HAQ decays the noise by 0.99 per episode over 600 episodes (20 of warm-up), ending at ``0.5 x 0.99**580 =
        0.0015``; here ``noise_decay`` is chosen so that the noise reaches that value at the last episode (0.99 for
        600 episodes; 0.93 for 100), so that a short search also ends by exploiting what it learned (our choice).
        """
        config = cls(**overrides)
        if "noise_decay" not in overrides:
            steps = max(int(episodes) - config.warmup_episodes - 1, 1)
            config = dataclasses.replace(config, noise_decay=float(0.99 ** (580 / steps)))
        return config

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_size", "buffer_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuantizationConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if (
            isinstance(self.warmup_episodes, bool)
            or not isinstance(self.warmup_episodes, int)
            or self.warmup_episodes < 0
        ):
            raise QuantizationConfigError(f"`warmup_episodes` must be an integer >= 0, got {self.warmup_episodes!r}.")
        for name, low, high, closed in (
            ("actor_lr", 0.0, math.inf, False),
            ("critic_lr", 0.0, math.inf, False),
            ("tau", 0.0, 1.0, True),
            ("discount", 0.0, 1.0, True),
            ("init_noise", 0.0, math.inf, True),
            ("noise_decay", 0.0, 1.0, True),
            ("baseline_momentum", 0.0, 1.0, True),
            ("updates_per_step", 0.0, math.inf, True),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (low <= value <= high if closed else low < value <= high)
            if not ok:
                bounds = f"[{low}, {high}]" if closed else f"({low}, {high}]"
                raise QuantizationConfigError(f"`{name}` must be a finite number in {bounds}, got {value!r}.")


# -- exploration --------------------------------------------------------------------------------------------------
def truncated_normal(
    mean: Tensor, std: float, generator: torch.Generator, low: float = 0.0, high: float = 1.0
) -> Tensor:
    """Samples of ``N(mean, std**2)`` truncated to ``[low, high]`` (inverse CDF, float64; ``std == 0``: clamp).

    >>> g = torch.Generator().manual_seed(0)
    >>> x = truncated_normal(torch.full((1000,), 0.9), 0.5, g)
    >>> bool(x.min() >= 0.0 and x.max() <= 1.0)
    True
    """
    mean = mean.double()
    if std <= 0:
        return mean.clamp(low, high)
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    a = normal.cdf((low - mean) / std)
    b = normal.cdf((high - mean) / std)
    u = torch.rand(mean.shape, generator=generator, dtype=torch.float64)
    p = (a + u * (b - a)).clamp(1e-12, 1 - 1e-12)
    return (mean + std * normal.icdf(p)).clamp(low, high)


def action_to_width(action: np.ndarray | float, choices: tuple[int, ...]) -> np.ndarray:
    """Actions in ``[0, 1]`` to continuous widths ``b_min - 0.5 + a (b_max - b_min + 1)``, clipped to ``[b_min,
    b_max]``: rounded to the nearest width, equal bins for consecutive widths (HAQ's mapping).

    >>> action_to_width(np.array([0.0, 0.5, 1.0]), (1, 2, 3, 4)).tolist()
    [1.0, 2.5, 4.0]
    """
    a = np.clip(np.asarray(action, dtype=np.float64), 0.0, 1.0)
    low, high = min(choices), max(choices)
    return np.clip(low - 0.5 + a * (high - low + 1), low, high)


def action_to_bits(action: np.ndarray | float, choices: tuple[int, ...]) -> np.ndarray:
    """Actions in ``[0, 1]`` to widths: ``len(choices)`` equal bins (HAQ's rounding for consecutive widths).

    >>> action_to_bits(np.array([0.0, 0.49, 0.51, 1.0]), (2, 4)).tolist()
    [2, 2, 4, 4]
    """
    a = np.clip(np.asarray(action, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((a * len(choices)).astype(np.int64), len(choices) - 1)
    return np.asarray(choices, dtype=np.int64)[index]


# -- replay buffer -------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """A ring buffer of ``(state, action, reward, next state, done)`` transitions, as tensors (saved whole)."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int) -> None:
        self.capacity = int(capacity)
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, action_dim)
        self.rewards = torch.zeros(capacity)
        self.next_states = torch.zeros(capacity, state_dim)
        self.dones = torch.zeros(capacity)
        self.position = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, states: Tensor, actions: Tensor, rewards: Tensor, next_states: Tensor, dones: Tensor) -> None:
        """Append a batch of transitions (the oldest are overwritten when full)."""
        for i in range(states.shape[0]):
            p = self.position
            self.states[p], self.actions[p], self.rewards[p] = states[i], actions[i], rewards[i]
            self.next_states[p], self.dones[p] = next_states[i], dones[i]
            self.position = (p + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """``batch_size`` transitions drawn uniformly with replacement."""
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return (
            self.states[index],
            self.actions[index],
            self.rewards[index],
            self.next_states[index],
            self.dones[index],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "states": self.states.clone(),
            "actions": self.actions.clone(),
            "rewards": self.rewards.clone(),
            "next_states": self.next_states.clone(),
            "dones": self.dones.clone(),
            "position": self.position,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, name).copy_(state[name])
        self.position, self.size = int(state["position"]), int(state["size"])


# -- DDPG --------------------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """``state -> 300 -> 300 -> action`` with ReLUs and a sigmoid output (actions in ``[0, 1]``)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, action_dim),
            nn.Sigmoid(),
        )

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state)


class Critic(nn.Module):
    """``Q(s, a)``: state and action branches added in the first hidden layer, then ``300 -> 1``."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.state_in = nn.Linear(state_dim, hidden)
        self.action_in = nn.Linear(action_dim, hidden, bias=False)
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        return self.net(self.state_in(state) + self.action_in(action)).squeeze(-1)


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


class DDPG:
    """One DDPG agent (actor, critic, their targets, Adam optimizers, a replay buffer and a reward baseline).

    Args:
        state_dim: size of a state vector.
        action_dim: size of an action (each entry in ``[0, 1]``).
        config: hyper-parameters.
        capacity: replay buffer size in transitions.
        seed: initialises the networks (the global RNG is left as it was).

    Example:
        >>> agent = DDPG(3, 1, DDPGConfig(hidden=16), capacity=100, seed=0)
        >>> agent.act(torch.zeros(3)).shape
        torch.Size([1])
    """

    def __init__(self, state_dim: int, action_dim: int, config: DDPGConfig, capacity: int, seed: int) -> None:
        self.config = config
        self.state_dim, self.action_dim = state_dim, action_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(state_dim, action_dim, config.hidden)
            self.critic = Critic(state_dim, action_dim, config.hidden)
        self.actor_target = Actor(state_dim, action_dim, config.hidden)
        self.critic_target = Critic(state_dim, action_dim, config.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.buffer = ReplayBuffer(capacity, state_dim, action_dim)
        self.baseline: float | None = None

    @torch.no_grad()
    def act(self, state: Tensor) -> Tensor:
        """The actor's (deterministic) action for one state."""
        return self.actor(state.float().unsqueeze(0)).squeeze(0)

    def update(self, generator: torch.Generator) -> tuple[float, float]:
        """One critic and one actor step on a sampled batch, then the soft target updates; the two losses."""
        cfg = self.config
        states, actions, rewards, next_states, dones = self.buffer.sample(cfg.batch_size, generator)
        mean = float(rewards.mean())
        self.baseline = (
            mean if self.baseline is None else self.baseline + cfg.baseline_momentum * (mean - self.baseline)
        )
        target = rewards - self.baseline
        if cfg.discount > 0:
            with torch.no_grad():
                next_q = self.critic_target(next_states, self.actor_target(next_states))
            target = target + cfg.discount * (1.0 - dones) * next_q
        critic_loss = torch.nn.functional.mse_loss(self.critic(states, actions), target)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        _soft_update(self.actor_target, self.actor, cfg.tau)
        _soft_update(self.critic_target, self.critic, cfg.tau)
        return float(critic_loss.detach()), float(actor_loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer.load_state_dict(state["buffer"])
        self.baseline = state["baseline"]


# -- agents ------------------------------------------------------------------------------------------------------
@dataclass
class Proposal:
    """What an agent proposes for one episode: one continuous weight width per unit (the projection shifts and
    rounds them), one input width per layer (``None``: not searched), the high-level goals (hierarchical agent), and
    the transitions to learn from once rewarded."""

    unit_bits: np.ndarray
    act_bits: np.ndarray | None
    goals: np.ndarray | None = None
    steps: dict[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)


class Agent(Protocol):
    """What :class:`PolicySearch` needs of an agent."""

    def propose(self, episode: int) -> Proposal: ...

    def learn(self, proposal: Proposal, reward: float, episode: int) -> dict[str, float | None]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _AgentBase:
    """Shared parts of the two agents: the generator, exploration, learning from one episode's transitions."""

    def __init__(self, problem: AllocationProblem, config: DDPGConfig, seed: int) -> None:
        self.problem = problem
        self.config = config
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.agents: dict[str, DDPG] = {}
        self.searches_act = problem.act_bit_choices is not None and bool(problem.act_searchable.any())

    def noise(self, episode: int) -> float:
        """Exploration standard deviation at ``episode`` (``inf`` during warm-up: uniform actions)."""
        if episode < self.config.warmup_episodes:
            return math.inf
        return self.config.init_noise * self.config.noise_decay ** (episode - self.config.warmup_episodes)

    def explore(self, agent: DDPG, state: Tensor, episode: int) -> Tensor:
        """The action taken in ``state``: uniform in warm-up, else the actor's with truncated-normal noise."""
        noise = self.noise(episode)
        if math.isinf(noise):
            return torch.rand(agent.action_dim, generator=self.generator, dtype=torch.float64).float()
        return truncated_normal(agent.act(state), noise, self.generator).float()

    def _learn(
        self, name: str, states: Tensor, actions: Tensor, rewards: Tensor, episode: int
    ) -> tuple[float | None, float | None]:
        agent = self.agents[name]
        steps = states.shape[0]
        next_states = torch.cat([states[1:], states[-1:]])
        dones = torch.zeros(steps)
        dones[-1] = 1.0
        agent.buffer.add(states, actions, rewards, next_states, dones)
        if episode + 1 < max(self.config.warmup_episodes, 1):
            return None, None  # still warming up: no update
        updates = round(self.config.updates_per_step * steps)
        losses = [agent.update(self.generator) for _ in range(updates)]
        if not losses:
            return None, None
        return float(np.mean([c for c, _ in losses])), float(np.mean([a for _, a in losses]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "agents": {name: agent.state_dict() for name, agent in self.agents.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for name, agent in self.agents.items():
            agent.load_state_dict(state["agents"][name])


class LayerAgent(_AgentBase):
    """HAQ's layer-level agent: one DDPG, one step per layer, all of a layer's units at the step's width.

    State of layer ``l``: its static features (:func:`~lightning_quant.allocation.units.layer_descriptors`,
    normalised per column) and the previous layer's action. Action: the weight width (and the input width when
    ``problem.act_bit_choices`` is set: a two-entry action instead of HAQ's alternating weight/input steps).
    """

    def __init__(self, problem: AllocationProblem, config: DDPGConfig | None = None, seed: int = 0) -> None:
        super().__init__(problem, config or DDPGConfig(), seed)
        self.static = torch.tensor(normalize_columns(problem.layer_features), dtype=torch.float32)
        self.action_dim = 2 if self.searches_act else 1
        state_dim = self.static.shape[1] + self.action_dim
        layers = problem.layout.num_layers
        self.agents["layer"] = DDPG(
            state_dim, self.action_dim, self.config, self.config.buffer_episodes * layers, self.seed
        )

    def propose(self, episode: int) -> Proposal:
        problem = self.problem
        layers = problem.layout.num_layers
        previous = torch.ones(self.action_dim)  # HAQ starts from "the largest width"
        states, actions = [], []
        for layer in range(layers):
            state = torch.cat([self.static[layer], previous])
            action = self.explore(self.agents["layer"], state, episode)
            states.append(state)
            actions.append(action)
            previous = action
        acts = torch.stack(actions).double().numpy()
        layer_bits = action_to_width(acts[:, 0], problem.bit_choices)
        act_bits = action_to_bits(acts[:, 1], problem.act_bit_choices) if self.searches_act else None  # type: ignore[arg-type]
        unit_bits = layer_bits[problem.layout.unit_layer]
        return Proposal(unit_bits, act_bits, steps={"layer": (torch.stack(states), torch.stack(actions))})

    def learn(self, proposal: Proposal, reward: float, episode: int) -> dict[str, float | None]:
        """Store the episode's transitions (all rewarded with ``reward``) and update (after warm-up); losses."""
        states, actions = proposal.steps["layer"]
        rewards = torch.full((states.shape[0],), float(reward))
        critic, actor = self._learn("layer", states, actions, rewards, episode)
        return {"critic_loss": critic, "actor_loss": actor}


class HierarchicalAgent(_AgentBase):
    """AutoQB's two-level agent: a layer-level DDPG picks goals (and input widths), a channel-level DDPG the widths.

    High level, one step per layer: state = the layer's static features and the previous layer's action;
    action = the goal (the layer's average weight width, continuous in ``[b_min, b_max]``) and, when searched, the
    input width. Low level, one step per unit: state = the layer's and the unit's static features, the goal
    (normalised) and the previous unit's action; action = the unit's width. Rewards: the high level gets the
    episode's extrinsic reward; every low-level step of layer ``l`` gets it plus ``intrinsic_weight x
    (-|mean width of l's proposal - goal_l| / (b_max - b_min))``.
    """

    MODES: ClassVar[tuple[str, ...]] = ("relative", "absolute")

    def __init__(
        self,
        problem: AllocationProblem,
        config: DDPGConfig | None = None,
        seed: int = 0,
        intrinsic_weight: float = 0.5,
        low_level: Literal["relative", "absolute"] = "relative",
    ) -> None:
        super().__init__(problem, config or DDPGConfig(), seed)
        if low_level not in self.MODES:
            raise QuantizationConfigError(f"`low_level` must be one of {list(self.MODES)}, got {low_level!r}.")
        self.low_level = low_level
        if not (
            isinstance(intrinsic_weight, (int, float)) and math.isfinite(intrinsic_weight) and intrinsic_weight >= 0
        ):
            raise QuantizationConfigError(f"`intrinsic_weight` must be a finite number >= 0, got {intrinsic_weight!r}.")
        self.intrinsic_weight = float(intrinsic_weight)
        layout = problem.layout
        self.layer_static = torch.tensor(normalize_columns(problem.layer_features), dtype=torch.float32)
        self.unit_static = torch.tensor(normalize_columns(problem.unit_features), dtype=torch.float32)
        self.high_dim = 2 if self.searches_act else 1
        high_state = self.layer_static.shape[1] + self.high_dim
        low_state = self.layer_static.shape[1] + self.unit_static.shape[1] + 2
        buffer = self.config.buffer_episodes
        self.agents["high"] = DDPG(high_state, self.high_dim, self.config, buffer * layout.num_layers, self.seed)
        self.agents["low"] = DDPG(low_state, 1, self.config, buffer * layout.num_units, self.seed + 1)

    def goal_bits(self, action: float) -> float:
        low, high = min(self.problem.bit_choices), max(self.problem.bit_choices)
        return low + float(action) * (high - low)

    def propose(self, episode: int) -> Proposal:
        problem, layout = self.problem, self.problem.layout
        high_states, high_actions, low_states, low_actions = [], [], [], []
        previous_high = torch.ones(self.high_dim)
        previous_low = torch.ones(1)
        goals = np.zeros(layout.num_layers)
        for layer in range(layout.num_layers):
            state = torch.cat([self.layer_static[layer], previous_high])
            action = self.explore(self.agents["high"], state, episode)
            high_states.append(state)
            high_actions.append(action)
            previous_high = action
            goals[layer] = self.goal_bits(float(action[0]))
            for u in layout.units_of(layer):
                low_state = torch.cat([self.layer_static[layer], self.unit_static[u], action[:1], previous_low])
                low_action = self.explore(self.agents["low"], low_state, episode)
                low_states.append(low_state)
                low_actions.append(low_action)
                previous_low = low_action
        low = torch.stack(low_actions).double().numpy()[:, 0]
        unit_bits = self.unit_bits(low, goals)
        act_bits = None
        if self.searches_act:
            high = torch.stack(high_actions).double().numpy()
            act_bits = action_to_bits(high[:, 1], problem.act_bit_choices)  # type: ignore[arg-type]
        steps = {
            "high": (torch.stack(high_states), torch.stack(high_actions)),
            "low": (torch.stack(low_states), torch.stack(low_actions)),
        }
        return Proposal(unit_bits, act_bits, goals, steps)

    def unit_bits(self, low: np.ndarray, goals: np.ndarray) -> np.ndarray:
        """The units' (continuous) widths from the low-level actions: HAQ's mapping of each action
        (``"absolute"``), or the layer's goal plus the unit's action above its layer's channel-weighted mean action,
        times the width range (``"relative"``: the low level only distributes the goal within the layer)."""
        choices = self.problem.bit_choices
        if self.low_level == "absolute":
            return action_to_width(low, choices)
        layout = self.problem.layout
        mean = layout.layer_mean_bits(low)[layout.unit_layer]
        wanted = goals[layout.unit_layer] + (max(choices) - min(choices)) * (low - mean)
        return np.clip(wanted, min(choices), max(choices))

    def intrinsic(self, proposal: Proposal) -> np.ndarray:
        """Per layer: ``-|mean proposed width - goal| / (b_max - b_min)`` (0 at the goal, -1 at worst)."""
        assert proposal.goals is not None
        span = max(max(self.problem.bit_choices) - min(self.problem.bit_choices), 1)
        return -np.abs(self.problem.layout.layer_mean_bits(proposal.unit_bits) - proposal.goals) / span

    def learn(self, proposal: Proposal, reward: float, episode: int) -> dict[str, float | None]:
        """Store both levels' transitions (the low level's with the intrinsic reward added) and update; losses."""
        states, actions = proposal.steps["high"]
        high = self._learn("high", states, actions, torch.full((states.shape[0],), float(reward)), episode)
        intrinsic = self.intrinsic(proposal)
        states, actions = proposal.steps["low"]
        low_rewards = reward + self.intrinsic_weight * intrinsic[self.problem.layout.unit_layer]
        low = self._learn("low", states, actions, torch.tensor(low_rewards, dtype=torch.float32), episode)
        return {
            "critic_loss": low[0],
            "actor_loss": low[1],
            "high_critic_loss": high[0],
            "high_actor_loss": high[1],
            "goal_error": float(-intrinsic.mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "intrinsic_weight": self.intrinsic_weight, "low_level": self.low_level}


# -- the search loop ---------------------------------------------------------------------------------------------
Evaluate = Callable[[np.ndarray, "np.ndarray | None"], float]


class PolicySearch:
    """The episode loop: propose, project onto the budgets, evaluate, reward, learn; keeps the best and a history.

    Args:
        problem: units, widths and budgets.
        agent: a :class:`LayerAgent` or :class:`HierarchicalAgent` (built on ``problem``).
        evaluate: ``(unit_bits, act_bits) -> metric`` of an allocation that meets the budget (higher is better:
            an accuracy, or a negative loss).
        reference: the metric's reference value (the float model's accuracy); rewards are relative to it.
        reward_scale: reward per unit of metric above the reference (10 on accuracies in ``[0, 1]`` is HAQ's 0.1
            per percentage point).
        cost_weight: subtracted ``cost_weight x budget used`` (the largest cost/budget fraction, ``<= 1``): a
            preference for cheaper allocations on top of the hard budget; 0 is HAQ's accuracy-only reward.

    Each history record: ``episode``, ``reward``, ``metric``, ``costs`` and ``budgets`` (user units),
    ``budget_used``, ``shift`` (the common offset the projection added to the proposed widths), ``bits`` (per unit,
    after projection), ``act_bits``, ``noise``, the agent's losses and ``seconds``. :attr:`best` is the record with the
    highest reward (the earliest on ties).
    """

    def __init__(
        self,
        problem: AllocationProblem,
        agent: Agent,
        evaluate: Evaluate,
        *,
        reference: float = 0.0,
        reward_scale: float = 10.0,
        cost_weight: float = 0.0,
    ) -> None:
        self.problem = problem
        self.agent = agent
        self.evaluate = evaluate
        self.reference = float(reference)
        self.reward_scale = float(reward_scale)
        self.cost_weight = float(cost_weight)
        self.episode = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        problem.check()

    def reward(self, metric: float, projection: Projection) -> float:
        return self.reward_scale * (metric - self.reference) - self.cost_weight * projection.budget_used

    def step(self) -> dict[str, Any]:
        """Run one episode; returns its history record."""
        start = time.perf_counter()
        episode = self.episode
        proposal = self.agent.propose(episode)
        projection = self.problem.project(proposal.unit_bits, proposal.act_bits)
        metric = float(self.evaluate(projection.unit_bits, projection.act_bits))
        reward = self.reward(metric, projection)
        losses = self.agent.learn(proposal, reward, episode)
        noise = getattr(self.agent, "noise", None)
        record: dict[str, Any] = {
            "episode": episode,
            "reward": reward,
            "metric": metric,
            "costs": dict(projection.costs),
            "budgets": dict(projection.budgets),
            "budget_used": projection.budget_used,
            "shift": projection.shift,
            "bits": projection.unit_bits.astype(int).tolist(),
            "act_bits": None if projection.act_bits is None else projection.act_bits.astype(int).tolist(),
            "noise": float(noise(episode)) if callable(noise) else math.nan,
            **{k: None if v is None else float(v) for k, v in losses.items()},
            "seconds": time.perf_counter() - start,
        }
        self.history.append(record)
        if self.best is None or reward > self.best["reward"]:
            self.best = dict(record)
        self.episode += 1
        return record

    def run(self, episodes: int, on_episode: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run until ``episodes`` episodes are done in all (a resumed search continues); returns the best record."""
        while self.episode < episodes:
            record = self.step()
            if on_episode is not None:
                on_episode(record)
        if self.best is None:
            raise QuantizationConfigError(f"`episodes` must be at least 1, got {episodes}.")
        return dict(self.best)

    def state_dict(self) -> dict[str, Any]:
        return {
            "episode": self.episode,
            "history": [dict(h) for h in self.history],
            "best": None if self.best is None else dict(self.best),
            "reference": self.reference,
            "agent": self.agent.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episode = int(state["episode"])
        self.history = [dict(h) for h in state["history"]]
        self.best = None if state["best"] is None else dict(state["best"])
        self.reference = float(state["reference"])
        self.agent.load_state_dict(state["agent"])


def random_allocations(problem: AllocationProblem, count: int, generator: torch.Generator) -> list[Projection]:
    """``count`` allocations from uniformly random proposals, projected onto the budgets like the agents' (a
    baseline at the same budget)."""
    out = []
    for _ in range(count):
        unit = torch.rand(problem.layout.num_units, generator=generator, dtype=torch.float64).numpy()
        acts = None
        if problem.act_bit_choices is not None:
            a = torch.rand(problem.layout.num_layers, generator=generator, dtype=torch.float64).numpy()
            acts = action_to_bits(a, problem.act_bit_choices)
        out.append(problem.project(action_to_width(unit, problem.bit_choices), acts))
    return out


__all__ = [
    "DDPG",
    "Actor",
    "Agent",
    "Critic",
    "DDPGConfig",
    "HierarchicalAgent",
    "LayerAgent",
    "PolicySearch",
    "Proposal",
    "ReplayBuffer",
    "action_to_bits",
    "action_to_width",
    "random_allocations",
    "truncated_normal",
]
