"""The registry of the built-in tasks, in the order the service lists them."""

from __future__ import annotations

from deployments import anime, layers, real
from deployments.task import Tasks

TASKS = Tasks(real.TASK, anime.TASK, layers.TASK)
