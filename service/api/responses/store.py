"""Stored responses, per tenant, for ``previous_response_id`` and ``GET /v1/responses/{id}``.

Each tenant keeps its most recent ``capacity`` responses (least recently used first out),
in memory: a restart forgets them, as it forgets sessions. A tenant never sees another's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from parrot.service.api.responses.protocol import ResponseObject

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    conversation: list[dict[str, Any]]  # chat messages up to and including this reply


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("a response store holds at least one response")
        self.capacity = capacity
        self._by_tenant: dict[str, OrderedDict[str, StoredResponse]] = {}

    def put(self, tenant: str, stored: StoredResponse) -> None:
        responses = self._by_tenant.setdefault(tenant, OrderedDict())
        responses[stored.response.id] = stored
        responses.move_to_end(stored.response.id)
        while len(responses) > self.capacity:
            responses.popitem(last=False)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        responses = self._by_tenant.get(tenant)
        if responses is None or response_id not in responses:
            return None
        responses.move_to_end(response_id)
        return responses[response_id]

    def delete(self, tenant: str, response_id: str) -> bool:
        responses = self._by_tenant.get(tenant)
        return responses is not None and responses.pop(response_id, None) is not None

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_tenant.values())
