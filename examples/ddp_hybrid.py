#!/usr/bin/env python
"""Data-parallel training of the hybrid tracking model with torch.distributed (DDP, gloo backend).

    .venv/bin/torchrun --standalone --nproc_per_node=2 examples/ddp_hybrid.py [--tracks 4096] [--steps 60]
    .venv/bin/torchrun --standalone --nproc_per_node=2 examples/ddp_hybrid.py --check-gradients out/ddp_check.json

The model of Example A: ``TrackEncoder`` (noisy hits -> perigee parameters)
followed by ``PerigeeHits`` (the Propagator: parameters -> predicted hits); the
loss is the chi^2 of the hit residuals per track (no truth labels), averaged over
the tracks a process holds. Every process simulates the same global training set
(same seed). The warm start uses one contiguous shard per process; in training,
every global batch is split into equal shares, one per process, so DDP's
average of the per-process gradients is the gradient of the global mean.

1. Warm start, distributed: the input whitening is computed from all shards
   (all-reduced moments), every process fits its own tracks by Gauss-Newton
   through the propagator (the expensive physics runs in parallel), and the
   encoder's linear part is solved from the all-reduced normal equations -- so
   all processes hold the same encoder.
2. End-to-end training: ``DistributedDataParallel`` around encoder + propagator,
   Adam on the chi^2; the gradient of every process flows through its own
   Dr.Jit propagator (VJP from the transport Jacobian) and DDP all-reduces the
   network gradients.

``--check-gradients PATH``: after the warm start, the DDP gradient of one global
batch is compared on rank 0 with the single-process gradient of the same batch
(an identical copy of the model, no DDP), and the parameters of all processes
are compared after two optimiser steps; the result goes to PATH as JSON.
Each process uses cpu_count / world Dr.Jit threads and one torch thread.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pyhybrid.engine import set_threads
from pyhybrid.nn.hybrid import gauss_newton_step

from hybrid_tracking import (Setup, make_physics, new_encoder, parameter_resolution, residuals_against,
                             sigma_per_layer, simulate)


# The handles of our gloo collectives, kept for the life of the process. Otherwise a gloo worker thread
# may drop the last reference to a finished collective, and freeing it needs the GIL (its tensors are
# Python objects); if that happens while the process group is being destroyed at exit, whose
# destructor holds the GIL and waits for that thread, the process hangs (pytorch/pytorch#56297; the
# DDP test hung this way in some runs). Kept here, they are freed by this thread after the process
# group is gone. There are few of them: the warm start's, one loss reduction after training, the check's.
_FINISHED_COLLECTIVES: list = []


def _wait(work) -> None:
    work.wait()
    _FINISHED_COLLECTIVES.append(work)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.clone()
    _wait(dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True))
    return total


def chi2_loss(model, hits: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mean over tracks of chi^2 / number of measurements (the canonical frame has no azimuth wrap)."""
    return ((model(hits) - hits) / sigma).pow(2).sum((1, 2)).mean() / hits[0].numel()


def warm_start(setup: Setup, shard: dict, sigma: torch.Tensor, radii: torch.Tensor):
    """Encoder identical on all processes: distributed whitening, local Gauss-Newton fits, reduced linear solve."""
    encoder = new_encoder(setup, shard["measured"], seed=setup.seed, reduce=all_reduce_sum)
    physics = make_physics(setup, scattering="none")
    residuals_of = residuals_against(physics, shard["measured"], sigma, radii)
    everything = torch.arange(shard["measured"].shape[0])
    with torch.no_grad():
        params = encoder(shard["measured"])
    for _ in range(5):
        params, _ = gauss_newton_step(lambda p: residuals_of(p, everything), params)
    with torch.no_grad():
        features = encoder.input_norm(encoder._features(shard["measured"]))
        encoder.network.solve_linear(features, encoder.from_perigee(params), reduce=all_reduce_sum)
    return encoder, physics


def global_batches(n_global: int, batch: int, steps: int, seed: int):
    """The same sequence of global index batches on every process."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randperm(n_global, generator=generator)[:batch]


def local_part(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's equal share of a global batch of track indices."""
    return indices.chunk(world)[rank]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=4096, help="global training tracks")
    parser.add_argument("--batch", type=int, default=512, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=60, help="end-to-end Adam steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--check-gradients", metavar="PATH", help="compare DDP and single-process gradients, "
                                                                  "write JSON to PATH and exit")
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:  # started without torchrun: say how instead of torch's rendezvous error
        raise SystemExit("launch with torchrun, e.g. .venv/bin/torchrun --standalone --nproc_per_node=2 "
                         "examples/ddp_hybrid.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    if args.tracks % world or args.batch % world:
        raise SystemExit(f"--tracks ({args.tracks}) and --batch ({args.batch}) must be multiples of the "
                         f"number of processes ({world})")
    set_threads(max(1, (os.cpu_count() or 1) // world))
    torch.set_num_threads(1)
    setup = Setup(seed=args.seed)
    sigma = sigma_per_layer(setup, torch.float64)
    radii = torch.tensor(setup.radii, dtype=torch.float64)
    data = simulate(setup, args.tracks, seed=setup.seed)
    shard_size = args.tracks // world
    shard = {key: value[rank * shard_size:(rank + 1) * shard_size] for key, value in data.items()}

    start = time.perf_counter()
    encoder, physics = warm_start(setup, shard, sigma, radii)
    model = torch.nn.Sequential(encoder, physics)
    ddp = DistributedDataParallel(model)
    warm_seconds = time.perf_counter() - start

    if args.check_gradients:
        check_gradients(args, ddp, model, data, sigma, rank, world)
        dist.destroy_process_group()
        return

    test = simulate(setup, 1000, seed=setup.seed + 1)
    with torch.no_grad():
        warm_resolution = parameter_resolution(encoder(test["measured"]), test["truth"])
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    for indices in global_batches(args.tracks, args.batch, args.steps, args.seed):
        mine = local_part(indices, rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss = chi2_loss(ddp, data["measured"][mine], sigma)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    train_seconds = time.perf_counter() - start
    losses = (all_reduce_sum(torch.stack(losses)) / world).tolist()  # mean over the processes, per step
    if rank == 0:
        with torch.no_grad():
            resolution = parameter_resolution(encoder(test["measured"]), test["truth"])
        print(f"{world} processes, {args.tracks} tracks, global batch {args.batch}: warm start {warm_seconds:.1f} s, "
              f"{args.steps} DDP steps in {train_seconds:.1f} s ({train_seconds / args.steps * 1e3:.0f} ms/step)")
        every = max(1, len(losses) // 6)
        shown = losses[::every] + ([losses[-1]] if (len(losses) - 1) % every else [])
        print("chi2 per measurement (global batch): " + " -> ".join(f"{x:.3g}" for x in shown))
        for label, values in (("after the warm start", warm_resolution), ("after DDP training", resolution)):
            print(f"test resolution (sigma68) {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items())
                  + "  [d0, z0 um; phi, theta mrad; q/p %]")
    dist.destroy_process_group()


def check_gradients(args, ddp, model, data, sigma, rank: int, world: int) -> None:
    """DDP gradient of a global batch vs the single-process gradient of the same batch; parameter sync."""
    reference = copy.deepcopy(model)  # identical parameters, no DDP
    indices = next(global_batches(args.tracks, args.batch, 1, args.seed))
    mine = local_part(indices, rank, world)
    chi2_loss(ddp, data["measured"][mine], sigma).backward()
    result = {}
    if rank == 0:
        chi2_loss(reference, data["measured"][indices], sigma).backward()
        pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if p.requires_grad]
        abs_diff = max(float((a - b).abs().max()) for a, b in pairs)
        scale = max(float(b.abs().max()) for _, b in pairs)
        result = {"world_size": world, "global_batch": int(indices.numel()), "n_parameter_tensors": len(pairs),
                  "max_abs_difference": abs_diff, "max_abs_gradient": scale, "max_rel_difference": abs_diff / scale}
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    optimizer.step()
    for batch in global_batches(args.tracks, args.batch, 2, args.seed + 1):
        optimizer.zero_grad(set_to_none=True)
        chi2_loss(ddp, data["measured"][local_part(batch, rank, world)], sigma).backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    _wait(dist.all_gather(gathered, flat, async_op=True))
    if rank == 0:
        result["max_parameter_difference_between_processes"] = max(float((g - gathered[0]).abs().max())
                                                                    for g in gathered)
        os.makedirs(os.path.dirname(os.path.abspath(args.check_gradients)), exist_ok=True)
        with open(args.check_gradients, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
