"""Layer benchmark: what each defense costs in a training step, and naive vs lean layers.

``bench_layers`` times one SGD training step (forward, backward, optimizer step) of ResNet-18 at
CIFAR shape, undefended and with each defense at its paper sites with the paper defaults, and
reports time and memory ratios against the undefended step beside the targets of issue 2. It
then compares the naive and the lean forms of the two layers whose naive forms don't scale
(TopKConv, KAF) at layer level.

What "memory" means:
    * CUDA: ``torch.cuda.max_memory_allocated`` over one training step (the real peak: weights,
      gradients, optimizer state, activations and temporaries).
    * CPU: PyTorch has no allocator statistics on CPU and process RSS is too noisy to resolve a
      layer, so we count *activation memory*: the bytes of the distinct storages autograd saves
      for backward (via ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) plus
      the output's bytes. That is what the lean layers are about (e.g. k-WTA keeps a bool mask,
      KAF must not keep N·C·H·W·D) and what dominates a step's peak at realistic batch sizes; it
      does not see transient buffers inside a kernel or recomputation during backward.
Both kinds are always reported (``act_bytes``; ``peak_bytes`` only on CUDA); the memory ratio
uses the peak on CUDA and the activation bytes on CPU (``mem_kind`` says which).

Timing: wall time of a whole step, median over ``repeats`` (minimum also kept), after one warm-up
step per configuration; the configurations are timed round-robin so load from other processes
on a shared machine spreads over all of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from defenses import (
    KernelActivation,
    TopKConv2d,
    build_model,
    cas_aux_loss,
    cas_labels,
    cas_modules,
    iter_defenses,
    kaf_naive,
    topk_conv2d_naive,
)
from defenses.cas import CAS_BETA

__all__ = ["bench_layers", "format_table", "network_rows", "targets"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _NetRow:
    """One network configuration: a defense and its paper-default parameters."""

    name: str
    defense: str | None
    params: dict[str, Any] = field(default_factory=dict)


def network_rows() -> tuple[_NetRow, ...]:
    """The undefended reference, then every registered defense at its search space's paper defaults."""
    from search_spaces import SPACES

    rows = [_NetRow("none", None)]
    for entry in iter_defenses():
        if entry.place is None:
            continue
        space = SPACES.get(entry.name)
        rows.append(_NetRow(entry.name, entry.name, dict(space.defaults) if space else {}))
    return tuple(rows)


def targets() -> dict[str, tuple[float | None, float | None]]:
    """(time ratio, memory ratio) targets, as each defense's registration declares them."""
    return {entry.name: entry.cost_budget for entry in iter_defenses() if entry.cost_budget}




def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _count_saved(exclude: set[int], seen: dict[int, int]) -> Iterator[None]:
    """Record ``storage ptr -> bytes`` of every distinct storage saved for backward."""

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Saved storages stay alive until backward, so their pointers are unique here.
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _param_ptrs(tensors: list[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _measure_all(
    steps: list[tuple[Callable[[], Tensor], list[Tensor]]],
    device: torch.device,
    repeats: int,
) -> list[dict[str, Any]]:
    """Median step time and activation/peak memory of each ``(step, params)``.

    ``step`` runs forward, backward (and the optimizer, if any) and returns the output. Timed
    steps go round-robin over the configurations (after one warm-up step each), so a slow
    period on a shared machine hits every configuration alike instead of skewing one ratio.
    """
    for step, _ in steps:
        step()  # warm-up: allocator, kernel selection, lazy state (e.g. momentum buffers)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for (step, _), record in zip(steps, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            record.append(time.perf_counter() - t0)
    results = []
    for (step, params), record in zip(steps, times, strict=True):
        seen: dict[int, int] = {}
        peak: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _count_saved(_param_ptrs(params), seen):
            out = step()
        if device.type == "cuda":
            _sync(device)
            peak = int(torch.cuda.max_memory_allocated(device))
        act = sum(seen.values()) + out.numel() * out.element_size()
        results.append(
            {
                "time_s": statistics.median(record),
                "time_min_s": min(record),
                "act_bytes": int(act),
                "peak_bytes": peak,
            }
        )
    return results


def _network_step(
    row: _NetRow, *, backbone: str, batch: int, image: int, width: float, device: torch.device
) -> tuple[Callable[[], Tensor], list[Tensor]]:
    torch.manual_seed(0)
    model = build_model(
        backbone, num_classes=10, in_channels=3, defense=row.defense, defense_params=row.params,
        width=width,
    ).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    use_cas = bool(cas_modules(model))  # an auxiliary loss, as the training recipes add it

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with cas_labels(model, y) if use_cas else contextlib.nullcontext():
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            if use_cas:
                loss = loss + CAS_BETA * cas_aux_loss(model, y)
        loss.backward()
        opt.step()
        return out.detach()

    return step, list(model.parameters())


def _layer_step(
    forward: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor]
) -> tuple[Callable[[], Tensor], list[Tensor]]:
    x = x.detach().requires_grad_(True)
    grad_out: list[Tensor] = []

    def step() -> Tensor:
        for p in [x, *params]:
            p.grad = None
        out = forward(x)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])
        return out.detach()

    return step, params


def _layer_rows(
    batch: int, image: int, device: torch.device
) -> list[tuple[str, str, str, Callable[[], tuple[Callable[[], Tensor], list[Tensor]]]]]:
    """(group, name, config, make) for the layer-level comparisons."""
    spatial_topk = max(1, image // 8)  # ResNet-18's layer4 resolution (4x4 at 32x32)
    torch.manual_seed(0)
    c_topk = 512
    k_topk = max(1, round(0.1 * c_topk))
    x_topk = torch.randn(batch, c_topk, spatial_topk, spatial_topk, device=device)
    lean_topk = TopKConv2d(c_topk, c_topk, 3, k=k_topk, criterion="max", padding=1).to(device)
    plain_conv = nn.Conv2d(c_topk, c_topk, 3, padding=1).to(device)
    with torch.no_grad():
        plain_conv.weight.copy_(lean_topk.weight)
        plain_conv.bias.copy_(lean_topk.bias)
    w, b = lean_topk.weight, lean_topk.bias
    topk_cfg = f"{c_topk}->{c_topk} 3x3 at {spatial_topk}x{spatial_topk}, k={k_topk}, max"

    c_kaf = 64  # ResNet-18's first stage, full resolution
    x_kaf = torch.randn(batch, c_kaf, image, image, device=device)
    lean_kaf = KernelActivation(c_kaf, dictionary_size=20).to(device)
    relu = nn.ReLU()
    kaf_cfg = f"{c_kaf} ch at {image}x{image}, D=20"
    return [
        (
            TopKConv2d.__name__,
            "conv2d",
            topk_cfg,
            lambda: _layer_step(plain_conv, x_topk, list(plain_conv.parameters())),
        ),
        (TopKConv2d.__name__, "TopKConv2d lean", topk_cfg, lambda: _layer_step(lean_topk, x_topk, [w, b])),
        (
            TopKConv2d.__name__,
            "TopKConv2d naive",
            topk_cfg,
            lambda: _layer_step(
                lambda x: topk_conv2d_naive(x, w, b, k_topk, "max", 1, 1), x_topk, [w, b]
            ),
        ),
        (KernelActivation.__name__, "relu", kaf_cfg, lambda: _layer_step(relu, x_kaf, [])),
        (
            KernelActivation.__name__,
            "KernelActivation lean",
            kaf_cfg,
            lambda: _layer_step(lean_kaf, x_kaf, list(lean_kaf.parameters())),
        ),
        (
            KernelActivation.__name__,
            "KernelActivation naive",
            kaf_cfg,
            lambda: _layer_step(
                lambda x: kaf_naive(x, lean_kaf.alpha, lean_kaf.dictionary, lean_kaf.gamma),
                x_kaf,
                list(lean_kaf.parameters()),
            ),
        ),
    ]


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref <= 0:
        return None
    return value / ref


def _ok(ratio: float | None, target: float | None) -> bool | None:
    if ratio is None or target is None:
        return None
    return ratio <= target


def bench_layers(
    batch: int = 128,
    device: str | None = None,
    repeats: int = 3,
    backbone: str = "resnet18",
    image: int = 32,
    layer_rows: bool = True,
    width: float = 1,
) -> list[dict[str, Any]]:
    """Benchmark a training step per defense (paper sites and defaults) and naive vs lean layers.

    Args:
        batch: Batch size (CIFAR papers: 128).
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when available.
        repeats: Timed steps per row (after one warm-up); the median is reported.
        backbone: Backbone of the network rows (issue 2: resnet18).
        image: Input height = width (CIFAR: 32).
        layer_rows: Also run the naive-vs-lean TopKConv and KAF layer rows.
        width: Channel multiplier of the network rows (1 = the papers' network; smaller for
            smoke tests). Layer rows always use the full-width shapes.

    Returns:
        One dict per row: ``kind`` ("network"/"layer"), ``name``, ``config``, ``time_s``
        (median), ``time_min_s``,
        ``act_bytes``, ``peak_bytes`` (CUDA only), ``mem_kind``, ``time_ratio``/``mem_ratio``
        against ``baseline`` (the undefended network, or for layer rows the plain layer),
        ``time_target``/``mem_target`` and ``time_ok``/``mem_ok`` (None where no target).
    """
    for name, value in (("batch", batch), ("repeats", repeats), ("image", image)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    mem_kind = "cuda_peak" if dev.type == "cuda" else "saved_activations"
    mem_key = "peak_bytes" if dev.type == "cuda" else "act_bytes"

    rows: list[dict[str, Any]] = []
    net_rows = network_rows()
    logger.info("bench %s: %d network configurations", backbone, len(net_rows))
    steps = [
        _network_step(row, backbone=backbone, batch=batch, image=image, width=width, device=dev)
        for row in net_rows
    ]
    for net_row, result in zip(net_rows, _measure_all(steps, dev, repeats), strict=True):
        rows.append(
            {
                "kind": "network",
                "name": net_row.name,
                "config": f"{backbone}{'' if width == 1 else f' width {width}'} {image}x{image} "
                f"batch {batch} {net_row.params or ''}".strip(),
                "mem_kind": mem_kind,
                **result,
            }
        )
    del steps
    if layer_rows:
        logger.info("bench layers: naive vs lean TopKConv and KAF")
        specs = _layer_rows(batch, image, dev)
        results = _measure_all([make() for *_, make in specs], dev, repeats)
        for (group, name, config, _), result in zip(specs, results, strict=True):
            rows.append(
                {
                    "kind": "layer",
                    "group": group,
                    "name": name,
                    "config": f"{config}, batch {batch}",
                    "mem_kind": mem_kind,
                    **result,
                }
            )

    budgets = targets()
    refs: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["kind"] == "network" and row["name"] == "none":
            refs[("network", "")] = row
        elif row["kind"] == "layer" and row["name"] in ("conv2d", "relu"):
            refs[("layer", row["group"])] = row
    for row in rows:
        ref = refs[(row["kind"], row.get("group", ""))]
        row["baseline"] = ref["name"]
        row["time_ratio"] = _ratio(row["time_s"], ref["time_s"])
        row["mem_ratio"] = _ratio(row[mem_key], ref[mem_key])
        budget = budgets.get(row["name"]) if row["kind"] == "network" else None
        time_target, mem_target = budget or (None, None)
        row["time_target"], row["mem_target"] = time_target, mem_target
        row["time_ok"] = _ok(row["time_ratio"], time_target)
        row["mem_ok"] = _ok(row["mem_ratio"], mem_target)
    return rows


def _fmt_ratio(ratio: float | None, target: float | None, ok: bool | None) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "-"
    text = f"{ratio:.2f}x"
    if target is not None:
        text += f" (≤{target:g}x {'pass' if ok else 'FAIL'})"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`bench_layers` rows as a markdown table (time in ms, memory in MiB)."""
    lines = [
        "| kind | row | config | time (ms) | time vs baseline | memory (MiB) "
        "| memory vs baseline |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for row in rows:
        mem = row["peak_bytes"] if row["mem_kind"] == "cuda_peak" else row["act_bytes"]
        lines.append(
            f"| {row['kind']} | {row['name']} | {row['config']} | {1e3 * row['time_s']:.1f} | "
            f"{_fmt_ratio(row['time_ratio'], row['time_target'], row['time_ok'])} "
            f"vs {row['baseline']} | "
            f"{mem / 2**20:.1f} | "
            f"{_fmt_ratio(row['mem_ratio'], row['mem_target'], row['mem_ok'])} |"
        )
    kinds = {row["mem_kind"] for row in rows}
    note = (
        "memory = torch.cuda.max_memory_allocated over one step"
        if kinds == {"cuda_peak"}
        else "memory = bytes saved for backward (distinct storages, parameters excluded) + output"
    )
    return "\n".join(lines) + f"\n\n{note}."
