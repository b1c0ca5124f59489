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
    decodes: list[Request], min_saved_tokens: int | None
) -> list[tuple[list[Request], int]]:
    """Split decode requests into (members, shared prefix length) groups; length 0 = plain.

    Requests group at a radix node that several of them pass through, starting at the
    first such node on their path. A request moves down to a deeper shared node ``Y``
    when that saves reads: ``Y``'s members then skip ``count(Y) * (P(Y) - P(here))``
    suffix tokens but ``Y``'s prefix is read once more, so a long prefix shared by a
    few splits off from a short one (a chat template) shared by all, while requests
    that share only a word more stay in the big group. A group runs two-phase when
    reading its prefix once instead of per member saves at least ``min_saved_tokens``
    token reads per layer, i.e. (members - 1) * prefix length. ``None`` turns it off.
    """
    if min_saved_tokens is None:
        return [(list(decodes), 0)] if decodes else []
    paths = [_path(req.node) for req in decodes]
    count: dict[int, int] = {}
    for path in paths:
        for node in path:
            count[id(node)] = count.get(id(node), 0) + 1
    by_node: dict[int, tuple[list[Request], int]] = {}
    plain: list[Request] = []
    for req, path in zip(decodes, paths, strict=True):
        here: RadixNode | None = None
        here_len = prefix_len = 0
        for node in path:
            prefix_len += len(node.key)
            n = count[id(node)]
            if n < 2:
                break
            if here is None or n == count[id(here)] or n * (prefix_len - here_len) > prefix_len:
                here, here_len = node, prefix_len
        if here is None:
            plain.append(req)
        else:
            by_node.setdefault(id(here), ([], here_len))[0].append(req)
    groups: list[tuple[list[Request], int]] = []
    for members, prefix_len in by_node.values():
        if len(members) >= 2 and (len(members) - 1) * prefix_len >= max(min_saved_tokens, 1):
            groups.append((members, prefix_len))
        else:
            plain.extend(members)
    if plain:
        groups.append((plain, 0))
    return groups


def _table(rows: list[list[int]], device: torch.device, dtype: torch.dtype):
    """The rows' slots padded to one width, the mask of the padding (None when there is
    none) and each row's length."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    if all(len(r) == width for r in rows):
        return table, None, lengths
    return table, additive_mask(lengths, width, dtype), lengths


def _consecutive(rows: list[list[int]], prefix_len: int) -> tuple[int, int] | None:
    """(start, length) when a plain group is one row whose slots run consecutively."""
    if len(rows) != 1 or prefix_len:
        return None
    slots = rows[0]
    start = slots[0]
    return (start, len(slots)) if slots == list(range(start, start + len(slots))) else None


def build_forward_batch(
    batch: ScheduledBatch, device: torch.device, dtype: torch.dtype, min_saved_tokens: int | None
) -> tuple[ForwardBatch, list[Request]]:
    """Return the step's tensors and the requests that sample a token, in logit-row order."""
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    samplers: list[Request] = []
    logit_rows: list[int] = []
    decode_groups: list[DecodeGroup] = []
    for members, prefix_len in group_by_shared_prefix(batch.decodes, min_saved_tokens):
        for req in members:
            pos = req.num_computed
            logit_rows.append(len(input_ids))
            input_ids.append(req.token_ids[pos])
            positions.append(pos)
            out_slots.append(req.slots[pos])
            samplers.append(req)
        rows = [r.slots[prefix_len:r.num_computed + 1] for r in members]
        table, mask, lengths = _table(rows, device, dtype)
        prefix = None
        if prefix_len:
            prefix = torch.tensor(members[0].slots[:prefix_len], dtype=torch.long, device=device)
        decode_groups.append(DecodeGroup(len(members), table, mask, prefix, _consecutive(rows, prefix_len),
                                         lengths))
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
