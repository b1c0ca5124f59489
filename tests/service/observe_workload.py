"""A known app for the observability tests: a map-reduce graph over the native API.

``num_maps`` map calls each summarize one chunk; one reduce call reads every summary. The
prompts carry ``marker`` so tests can check where prompt text does (not) appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass
class MapReduce:
    session_id: str
    map_ids: list[str]
    reduce_id: str
    final: str  # the reduce output's text

    @property
    def call_ids(self) -> list[str]:
        return [*self.map_ids, self.reduce_id]

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(m, self.reduce_id) for m in self.map_ids]


def _out(var: str, max_tokens: int) -> dict:
    return {"type": "output", "var": var, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}


def submit_map_reduce(http: httpx.Client, *, num_maps: int = 3, marker: str = "chunk", max_tokens: int = 6,
                      delete: bool = False, criterion: str = "latency", timeout_s: float = 60) -> MapReduce:
    """Run the app to its end (the reduce output fetched with ``criterion``)."""
    sid = http.post("/v1/sessions", json={}).json()["id"]
    variables = [{"id": f"chunk{i}", "value": f"{marker} number {i} of the document"}
                 for i in range(num_maps)]
    variables += [{"id": f"sum{i}"} for i in range(num_maps)] + [{"id": "final"}]
    calls = [{"id": f"map{i}", "name": f"map{i}",
              "segments": [{"type": "text", "text": "Summarize: "}, {"type": "input", "var": f"chunk{i}"},
                           {"type": "text", "text": " Summary: "}, _out(f"sum{i}", max_tokens)]}
             for i in range(num_maps)]
    reduce_segments: list[dict] = [{"type": "text", "text": "Combine the summaries:"}]
    for i in range(num_maps):
        reduce_segments += [{"type": "text", "text": f" ({i}) "}, {"type": "input", "var": f"sum{i}"}]
    reduce_segments += [{"type": "text", "text": " Final: "}, _out("final", max_tokens)]
    calls.append({"id": "reduce", "name": "reduce", "segments": reduce_segments})
    resp = http.post("/v1/graphs", json={"session_id": sid, "variables": variables, "calls": calls,
                                         "fetches": [{"var": "final", "criterion": criterion}]})
    resp.raise_for_status()
    got = http.get(f"/v1/sessions/{sid}/variables/final", params={"timeout": timeout_s})
    got.raise_for_status()
    body = got.json()
    assert body.get("ready"), body
    if delete:
        http.delete(f"/v1/sessions/{sid}").raise_for_status()
    return MapReduce(sid, [f"map{i}" for i in range(num_maps)], "reduce", body.get("value") or "")
