"""The state every workload stores, and its bytes as the raw sides write them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["STATE_VARIANTS", "BenchState", "make_states", "payload_of"]

STATE_VARIANTS = 64
"""How many distinct states the workloads cycle through."""


class BenchState(BaseModel):
    """The state every workload stores: a few scalar fields and a list of strings, ~1 KB as JSON.

    Representative of the per-user state the library is for (a cart, an
    agent's memory), and large enough that payload transfer and JSON decoding
    weigh in as they would in production.
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    owner: str
    counter: int
    balance: float
    active: bool
    tags: list[str]


def make_states(count: int, tags: int = 30) -> list[BenchState]:
    """`count` distinct states, built before timing starts: about 1 KB each with the
    default 30 tags (each tag about 30 bytes)."""
    return [
        BenchState(
            owner=f"owner-{i:04d}",
            counter=i,
            balance=round(1000.0 + i * 3.25, 2),
            active=i % 2 == 0,
            tags=[f"tag-{i:04d}-{j:02d}-abcdefghijklmnop" for j in range(tags)],
        )
        for i in range(count)
    ]


def payload_of(state: BenchState) -> bytes:
    """The raw baselines' payload: pydantic's JSON, as the library stores it."""
    return state.model_dump_json().encode()
