"""The engine fleet: `prge device-train` on several processes, each running one rank's program.

    prge export --ranks 2 --q 8 ... --out fleet.pte             # one program, every rank loads it
    torchrun --nproc-per-node 2 -m prge device-train --program fleet.pte --out runs/f ...

The scheme is `prge.run.dist`'s query split, inside the exported program (`StepProgram.fleet`): rank r
calls train_step with its first global query id r·q/W and gets the 2·q/W losses of its queries; the
ranks all-gather them (4 bytes each), every rank computes the q values of g and calls the program's
`update`, which regenerates all q noise tensors from the step's key and applies the same update to
the clean B the program keeps. No weights cross the network. Rank 0 evaluates, prints progress and
writes metrics, checkpoints and adapters (`prge.run.loop.Plan.record`); a checkpoint holds the clean
B, so a resume (or a torchrun restart) continues from rank 0's checkpoints/last, which rank 0 reads
and broadcasts. The same step's ranks check at the start that they run the same program, data and
settings, and every `check_every` steps that their B are bit-identical (as `prge train` does).

The C++ runner stays single-process: it refuses a fleet program with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from prge import io
from prge.data.batch import step_indices
from prge.engine.runtime import scalar, split_rows
from prge.errors import PrgeError
from prge.run import dist as rdist
from prge.run.dist import Share, quiet_off_rank0
from prge.zo import estimator as est

DIST_TIMEOUT = 300.0  # seconds a rank waits for the others at the start and in every exchange


def check_world(manifest: dict, program_path) -> None:
    """A fleet program runs under torchrun with exactly its number of ranks; a plain one alone."""
    ranks, world = manifest.get("ranks", 1), int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == world:
        return
    if ranks == 1:
        raise PrgeError(f"{program_path} is a one-process program, but {world} processes were started",
                        f"export it for {world} ranks (prge export --ranks {world} ...), or run one process")
    raise PrgeError(f"{program_path} is exported for {ranks} ranks (q/{ranks} queries each), but "
                    f"{'one process was' if world == 1 else f'{world} processes were'} started",
                    f"run it with torchrun --nproc-per-node {ranks} -m prge device-train ..., or export it again with --ranks {world}")


@dataclass
class FleetStepper(rdist.DistStepper):
    """`prge.run.loop.Stepper` for one rank of an engine fleet (see the module docstring): `prge train`'s
    rank stepper (rank 0 evaluates and saves, the others wait; a checkpoint is read by rank 0 and its
    trained values broadcast) with the program's step and its state in place of the eager ones."""

    check_every: int = 50  # `inner` is the rank's EngineStepper; `lora` stays empty (the program holds B)

    def step(self, step: int) -> tuple[float, float]:
        s, m = self.inner, self.inner.m
        q, mine = m["q"], m["q"] // m["ranks"]
        batch = split_rows(s.tensors, "train", step_indices(s.n_train, m["batch_size"], s.seed, step))
        key = torch.tensor([s.seed, step], dtype=torch.int64)
        first = torch.tensor([self.share.rank * mine], dtype=torch.int64)
        local = s.engine("train_step", *batch, scalar(0.0), scalar(s.eps), torch.zeros(q), key, first)[0]
        losses = self.share.gather(local)
        if not torch.isfinite(losses).all():
            raise quiet_off_rank0(self.share, PrgeError(
                f"non-finite loss at step {step} ({losses.tolist()}); the last good checkpoint is kept in {s.last}",
                "lower --lr or --eps and resume, or start again"))
        g = est.projected_grad(losses[:q], losses[q:], s.eps, s.normalize)
        s.engine("update", g, scalar(s.lr_of(step)), key)
        rdist.kill_hook(self.share, step)
        if self.check_every and step % self.check_every == 0:
            self.check(step)
        return float(losses.mean()), float(g.abs().mean())

    def check(self, step: int) -> None:
        """Stop if the ranks' B differ after `step` (`prge.run.dist.check_in_step`)."""
        rdist.check_in_step(self.share, [self.inner.final_b(step)], step)

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Rank 0's program state (the clean B and ε) into every rank's program."""
        raw = self.inner.engine("read_raw")[0]
        dist.broadcast(raw, src=0)
        if not self.rank0:
            self.inner.engine("write_raw", raw)


def join(manifest: dict, tensors_sha: str, settings: dict, threads: int = 0) -> Share:
    """Join the fleet's process group and check that every rank runs the same program, data and settings
    (after `check_world`, which `device_train` calls first)."""
    store = rdist.join(DIST_TIMEOUT, "cpu", threads)
    share = Share(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), manifest["q"], store)
    prints = {"program": manifest.get("program_sha256") or "", "data": tensors_sha, **{k: repr(v) for k, v in settings.items()}}
    rdist.check_same(share, prints, set(settings))
    return share


def resume_decision(share: Share, resume: bool, last: Path, started: bool, log) -> bool:
    """Rank 0's decision, for every rank: --resume, or after a torchrun restart (--max-restarts) its
    checkpoints/last if there is one (the other ranks need no copy of the run folder). A run folder
    stopped before its first checkpoint starts again, as `prge device-train` does on one process."""
    decided = [False]
    if share.rank == 0:
        wanted = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        have = (io.resolve_dir(last) / "trainer_state.json").is_file()
        if wanted and not have and started:
            log(f"prge: {last.parent.parent} was stopped before its first checkpoint; starting again at step 0")
        decided = [wanted and (have or not started)]
    dist.broadcast_object_list(decided, src=0)
    return bool(decided[0])
