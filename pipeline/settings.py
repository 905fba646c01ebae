"""How the retrain flow behaves: retries, timeouts, waiting for the workspace, and its schedule.

Retries and timeouts change no result, so they stay out of ``params.yaml`` (which DVC tracks and
the stages validate): they are environment variables with defaults, ``RETRAIN_<FIELD>`` for each
field of :class:`Settings`. The schedule is a product decision and lives in ``params.yaml``
(section ``schedule``), read by :func:`cron_schedule`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prefect.schedules import Cron, Schedule

from contrastive.config import load_params

ENV_PREFIX = "RETRAIN_"


@dataclass(frozen=True)
class Settings:
    """Orchestration settings; each one is read from ``RETRAIN_<NAME>`` (upper case) if set."""

    stage_timeout_s: float = 3600.0
    """Time limit of each stage but pretrain, and of the refresh and experiment steps."""
    pretrain_timeout_s: float = 24 * 3600.0
    """Time limit of one pretraining attempt."""
    pretrain_retries: int = 2
    """Retries of a failed pretraining; each one resumes from ``checkpoints/last.pt``."""
    retry_delay_s: float = 60.0
    """Wait before the first retry; it doubles for each further retry (exponential back-off)."""
    lock_wait_s: float = 0.0
    """How long a retrain waits for another one in the same workspace before it cancels itself."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The defaults, overridden by the ``RETRAIN_*`` variables that are set in ``env``."""
        values: dict[str, float | int] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            if name not in env:
                continue
            kind = type(field.default)
            try:
                value = kind(env[name])
                if value < 0:
                    raise ValueError
            except ValueError:
                message = f"{name} must be >= 0 ({kind.__name__}), got {env[name]!r}"
                raise ValueError(message) from None
            values[field.name] = value
        return cls(**values)  # type: ignore[arg-type]


def cron_schedule(project: Path) -> Schedule:
    """The Prefect schedule of ``params.yaml``'s ``schedule`` section (weekly by default)."""
    schedule = load_params(project / "params.yaml").schedule
    return Cron(schedule.cron, timezone=schedule.timezone)
