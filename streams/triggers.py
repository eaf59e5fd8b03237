"""When a user's examples become a training request. Plain functions of the state.

- `threshold`: gaps since the user's last request (within the window) >= min_gap_events.
- `continuous`: any new examples, at most once per `continuous_min_interval_s`.
- `nightly`: the leader's crontab ticks; every user with new examples.
- `on-demand`: a retrain command; honoured under every schedule, ignores the cooldown.
- `accuracy-drop`: alongside any schedule, when the rolling satisfaction rate
  (good outcomes / rated outcomes over the last N) falls below the floor; fires
  once per dip and re-arms when the rate recovers.
Automatic triggers respect the per-user cooldown, and no trigger fires while a
request is open (an on-demand command waits for it, see `streams.processor`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.settings import Settings, defaults
from streams.state import UserState, accuracy, gaps_in_window


@dataclass(frozen=True)
class TriggerConfig:
    """The seed's `schedule` and `min_gap_events` with `streams.triggers`; defaults in core.settings."""

    schedule: str
    min_gap_events: int
    gap_window_s: float
    cooldown_s: float
    continuous_min_interval_s: float
    min_new_examples: int
    open_request_timeout_s: float
    accuracy_drop: bool
    accuracy_floor: float
    accuracy_min_samples: int

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> TriggerConfig:
        s = settings or defaults()
        t = s.streams.triggers
        config = cls(
            schedule=s.schedule,
            min_gap_events=s.min_gap_events,
            gap_window_s=t.gap_window_s,
            cooldown_s=t.cooldown_s,
            continuous_min_interval_s=t.continuous_min_interval_s,
            min_new_examples=t.min_new_examples,
            open_request_timeout_s=t.open_request_timeout_s,
            accuracy_drop=t.accuracy_drop,
            accuracy_floor=t.accuracy_floor,
            accuracy_min_samples=t.accuracy_min_samples,
        )
        return replace(config, **overrides)


def update_accuracy_alarm(state: UserState, cfg: TriggerConfig) -> bool:
    """True when the accuracy-drop trigger should fire now (and arm the alarm)."""
    rate = accuracy(state)
    if not cfg.accuracy_drop or rate is None or len(state.outcomes) < cfg.accuracy_min_samples:
        return False
    if rate >= cfg.accuracy_floor:
        state.accuracy_alarm = False
        return False
    if state.accuracy_alarm:
        return False
    return True


def automatic_trigger(state: UserState, now: float, cfg: TriggerConfig) -> str | None:
    """The trigger that fires for `state` after an event (or command, or lifecycle event), if any."""
    dropped = update_accuracy_alarm(state, cfg)
    if state.open_request is not None or state.pending_count < cfg.min_new_examples:
        return None
    if state.last_request_at is not None and now - state.last_request_at < cfg.cooldown_s:
        return None
    if dropped:
        state.accuracy_alarm = True
        return "accuracy-drop"
    if cfg.schedule == "threshold" and gaps_in_window(state, now, cfg.gap_window_s) >= cfg.min_gap_events:
        return "threshold"
    if cfg.schedule == "continuous" and (
        state.last_request_at is None or now - state.last_request_at >= cfg.continuous_min_interval_s
    ):
        return "continuous"
    return None


def nightly_trigger(state: UserState, cfg: TriggerConfig) -> str | None:
    if cfg.schedule != "nightly" or state.open_request is not None or state.pending_count < cfg.min_new_examples:
        return None
    return "nightly"
