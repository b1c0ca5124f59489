"""Turn a scheduled batch into the model's input tensors.

Decode requests are grouped by the radix-cache path they are locked on: requests
whose paths start with the same nodes hold the same physical prefix slots, and
such a group runs two-phase attention (the prefix KV read once for the group).
"""

from __future__ import annotations

import torch

from parrot.service.engine.builtin.model import DecodeGroup, ForwardBatch
from parrot.service.engine.builtin.radix_cache import RadixNode
from parrot.service.engine.builtin.request import Request
from parrot.service.engine.builtin.scheduler import ScheduledBatch
from parrot.service.kernels.attention import additive_mask


def _path(node: RadixNode | None) -> list[RadixNode]:
    out: list[RadixNode] = []
    while node is not None and node.parent is not None:
        out.append(node)
        node = node.parent
    return out[::-1]


def group_by_shared_prefix(
    decodes: list[Request], min_prefix: int, min_group: int = 2
) -> list[tuple[list[Request], int]]:
    """Split decode requests into (members, shared prefix length) groups; 0 = plain group."""
    by_first: dict[int, list[tuple[Request, list[RadixNode]]]] = {}
    plain: list[Request] = []
    for req in decodes:
        path = _path(req.node)
        if path:
            by_first.setdefault(id(path[0]), []).append((req, path))
        else:
            plain.append(req)
    groups: list[tuple[list[Request], int]] = []
    for members in by_first.values():
        common = members[0][1]
        for _, path in members[1:]:
            n = 0
            while n < min(len(common), len(path)) and common[n] is path[n]:
                n += 1
            common = common[:n]
        prefix_len = sum(len(node.key) for node in common)
        if len(members) >= min_group and prefix_len >= min_prefix:
            groups.append(([req for req, _ in members], prefix_len))
        else:
            plain.extend(req for req, _ in members)
    if plain:
        groups.append((plain, 0))
    return groups


def _table(rows: list[list[int]], device: torch.device, dtype: torch.dtype):
    lengths = [len(r) for r in rows]
    width = max(lengths)
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    if min(lengths) == width:
        return table, None
    return table, additive_mask(torch.tensor(lengths, device=device), width, dtype)


def build_forward_batch(
    batch: ScheduledBatch, device: torch.device, dtype: torch.dtype, min_shared_prefix: int
) -> tuple[ForwardBatch, list[Request]]:
    """Return the step's tensors and the requests that sample a token, in logit-row order."""
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    samplers: list[Request] = []
    logit_rows: list[int] = []
    decode_groups: list[DecodeGroup] = []
    for members, prefix_len in group_by_shared_prefix(batch.decodes, min_shared_prefix):
        for req in members:
            pos = req.num_computed
            logit_rows.append(len(input_ids))
            input_ids.append(req.token_ids[pos])
            positions.append(pos)
            out_slots.append(req.slots[pos])
            samplers.append(req)
        table, mask = _table([r.slots[prefix_len:r.num_computed + 1] for r in members], device, dtype)
        prefix = None
        if prefix_len:
            prefix = torch.tensor(members[0].slots[:prefix_len], dtype=torch.long, device=device)
        decode_groups.append(DecodeGroup(len(members), table, mask, prefix))
    prefills = []
    for req, n in batch.prefills:
        start = req.num_computed
        row = len(input_ids)
        input_ids.extend(req.token_ids[start:start + n])
        positions.extend(range(start, start + n))
        out_slots.extend(req.slots[start:start + n])
        key_slots = torch.tensor(req.slots[: start + n], dtype=torch.long, device=device)
        prefills.append((row, n, key_slots))
        if start + n == len(req.token_ids):
            samplers.append(req)
            logit_rows.append(row + n - 1)

    def as_tensor(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    forward = ForwardBatch(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        out_slots=as_tensor(out_slots),
        decode_groups=decode_groups,
        prefills=prefills,
        logit_rows=as_tensor(logit_rows),
    )
    return forward, samplers
