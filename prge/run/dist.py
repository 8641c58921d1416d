"""Query-parallel P-RGE across processes and machines (torch.distributed, launched by torchrun).

    torchrun --standalone --nproc-per-node 2 -m prge train --q 8 --out runs/x ...

Every query's noise is a pure function of (seed, step, tensor, global query id) (`prge.zo.estimator`),
so any process can regenerate any query's z. Rank r of W evaluates the global queries
[r·q/W, (r+1)·q/W) of each step on the same batch, the ranks all-gather their 2·q/W losses (float32,
4 bytes each), and every rank applies the same update from all q values of g. Nothing else crosses the network during training: no weights, no gradients.

Rank 0 is the one writer: it evaluates, prints progress, writes metrics, checkpoints, adapters and the
summary (`prge.run.loop.Plan.record`); the other ranks take the same steps and write nothing.
Nothing saved depends on the rank, so a run resumes with any world size. After a torchrun restart
(`--max-restarts K`: one rank died, all are restarted) the ranks continue from rank 0's
checkpoints/last in --out: rank 0 reads it and broadcasts the trained tensors, so the other machines
need no copy of the run folder.

At the start the ranks all-gather a hash of each configuration field and of the data and model
weights, and stop with one `error:` line on rank 0 naming the first difference. Every --check-every
steps (and at the end) they compare a checksum of B; a mismatch stops the run with an error naming
the step: identical inputs give identical updates on identical hardware and libraries, so a
difference means the ranks no longer train the same model (e.g. different CPU kernels), which a
silent re-broadcast would hide.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from prge import io
from prge.config import TrainConfig, to_yaml
from prge.errors import PrgeError
from prge.log import say
from prge.run import loop
from prge.run.loop import Plan

# configuration fields that may differ between ranks: paths (the data and weights are hashed instead),
# where the CPU threads and the device go, and how the run is shown
LOCAL_FIELDS = ("data_root", "train_file", "eval_file", "model", "device", "threads", "out", "resume", "progress")


EVAL_WAIT = datetime.timedelta(days=7)


def launched() -> bool:
    """True in a process started by torchrun (or with the same environment) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Share:
    """This process's part of every step: global queries `queries` on the step's examples `rows` (all
    queries on 1/W of the examples in data-parallel mode), losses exchanged by `gather`."""

    rank: int
    world: int
    q: int
    store: object = None  # the job's key-value store (dist.Store): the other ranks wait on it while rank 0 evaluates
    exchange_seconds: float = 0.0  # time spent in the all-gather (benchmarks read it)
    exchanges: int = 0
    data: bool = False  # data-parallel: every rank evaluates all q queries on its 1/W of the examples
    loss: str = "class"  # the loss kind: what a rank's share of a data-parallel batch weighs (rows or answer tokens)

    @property
    def queries(self) -> slice:
        if self.data:
            return slice(0, self.q)
        n = self.q // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def rows(self, indices: list[int]) -> list[int]:
        """This rank's examples of the step (contiguous shares in data-parallel mode, else all)."""
        if not self.data:
            return indices
        n = len(indices) // self.world
        return indices[self.rank * n:(self.rank + 1) * n]

    def weight(self, batch) -> float:
        """What this rank's per-copy mean losses average over: rows (class loss) or answer tokens (LM loss)."""
        return float(batch.target_mask[:, :1].sum() if self.loss == "class" else batch.target_mask.sum())

    def gather(self, local: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """(2·q/W,) local losses [L⁺ of my queries, L⁻ of my queries] -> (2q,) [L⁺_1..q, L⁻_1..q] of all ranks.
        Data-parallel: (2q,) local mean losses -> their mean over the ranks, each weighted by `weight`
        (its rows or answer tokens), so that it is the mean over the whole step's batch."""
        t = time.perf_counter()
        if self.data:
            local = torch.cat([local * weight, local.new_tensor([weight])])
        parts = [torch.empty_like(local) for _ in range(self.world)]
        try:
            dist.all_gather(parts, local.contiguous())
        except RuntimeError as e:  # a peer died or timed out; torchrun restarts every rank if --max-restarts allows
            lost = PrgeError(f"rank {self.rank} lost the other ranks during a step's exchange ({str(e).splitlines()[0][:160]})",
                             "see the other ranks' output; torchrun --max-restarts K restarts them from rank 0's last checkpoint")
            lost.quiet = False  # each rank's own news: every rank prints it
            raise lost from None
        self.exchange_seconds += time.perf_counter() - t
        self.exchanges += 1
        if self.data:
            total = torch.stack(parts).sum(0)
            return total[:-1] / total[-1]
        return torch.stack(parts).reshape(self.world, 2, -1).transpose(0, 1).reshape(-1)


def check_split(q: int, world: int) -> None:
    if q % world:
        near = sorted({max(world, q - q % world), q + world - q % world})
        raise PrgeError(f"--q {q} queries do not split evenly over {world} processes",
                        f"pass --q {' or '.join(map(str, near))} (a multiple of {world}), or start a number of processes that divides {q}")


def start(cfg: TrainConfig) -> Share:
    """Join the process group (gloo on CPU, NCCL on CUDA), pin this process to its share of the cores."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.method != "prge":
        raise PrgeError(f"--method {cfg.method} does not run on several processes here", "use --method prge, or start one process")
    if cfg.parallel == "data":
        if cfg.batch_size % world:
            raise PrgeError(f"--parallel data splits the --batch-size {cfg.batch_size} examples of a step over {world} processes, "
                            "which does not divide evenly", f"pass a --batch-size that is a multiple of {world}")
    else:
        check_split(cfg.q, world)
    store = join(cfg.dist_timeout, cfg.device, cfg.threads)
    return Share(rank, world, cfg.q, store, data=cfg.parallel == "data")


def join(timeout_s: float, device: str = "cpu", threads: int = 0):
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA), after pinning this process to its
    share of the machine's cores when `threads` is 0; the job's key-value store."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local if device == "cuda" else torch.device(device))
    if not threads:  # my share of this machine's cores
        cores = sorted(os.sched_getaffinity(0))
        n = max(1, len(cores) // local_world)
        mine = cores[local * n:(local + 1) * n] if len(cores) >= local_world else cores
        try:
            os.sched_setaffinity(0, mine)
        except OSError:  # a container may forbid it: the thread count alone still shares the cores
            pass
        torch.set_num_threads(len(mine))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's store outlives a restart: without a fresh prefix the restarted ranks read the dead
        # ranks' addresses and gloo waits on them
        store = dist.PrefixStore(f"prge/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise PrgeError(f"rank {rank} could not reach the other ranks at {where} within {timeout_s:g} s "
                        f"({str(e).splitlines()[0][:120]})",
                        "check the address, the port and the firewall, and that all ranks were started (--dist-timeout sets the wait)") from None
    return store


def fingerprint(cfg: TrainConfig, s) -> dict[str, str]:
    """What must be the same on every rank: the configuration, the data and the model's weights."""
    out = {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in LOCAL_FIELDS}
    for split in ("train", "dev", "test"):
        out[f"{split} data"] = repr([(e.prompt_ids, e.answer_ids, e.label) for e in getattr(s, split)])
    with torch.no_grad():
        out["model weights"] = repr([float(p.double().sum()) for n, p in s.model.named_parameters() if "lora_" not in n])
    return out


def _hash64(text: bytes) -> int:
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)


def _gather_ints(share: Share, values: list[int], device) -> torch.Tensor:
    """(W, len(values)) int64 from every rank."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(share.world)]
    dist.all_gather(parts, mine)
    return torch.stack(parts).cpu()


def check_same_setup(share: Share, cfg: TrainConfig, s) -> None:
    check_same(share, fingerprint(cfg, s), {f.name for f in dataclasses.fields(cfg)}, s.params[0].device)


def check_same(share: Share, prints: dict[str, str], shown: set[str], device="cpu") -> None:
    """Stop with one line on rank 0 naming the first of `prints` (name -> repr) that differs between
    the ranks (all-gathered as 64-bit hashes); the value of a name in `shown` is quoted."""
    names = sorted(prints)
    table = _gather_ints(share, [_hash64(prints[n].encode()) for n in names], device)
    for j, name in enumerate(names):
        differ = [r for r in range(share.world) if table[r, j] != table[0, j]]
        if differ:
            mine = f" (rank 0: {name} = {prints[name]})" if name in shown else ""
            raise quiet_off_rank0(share, PrgeError(
                f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} started with other {name} than rank 0{mine}",
                "start every rank with the same command, data and model files"))


def checksum(params: list[torch.Tensor]) -> int:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return _hash64(h.digest())


def check_in_step(share: Share, params: list[torch.Tensor], step: int) -> None:
    """Stop if the ranks' trained tensors differ after `step`."""
    sums = _gather_ints(share, [checksum(params)], params[0].device)[:, 0]
    differ = [r for r in range(share.world) if sums[r] != sums[0]]
    if differ:
        raise quiet_off_rank0(share, PrgeError(
            f"the trained tensors of rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} differ from rank 0's "
            f"after step {step}; checkpoints/last holds rank 0's",
            "run every rank on the same CPU/GPU type and the same torch version, then resume from the run folder"))


def quiet_off_rank0(share: Share, e: PrgeError) -> PrgeError:
    """Errors every rank detects together are printed once, by rank 0 (the CLI skips `quiet` ones)."""
    if not hasattr(e, "quiet"):
        e.quiet = share.rank != 0
    return e


def after_rank0(share: Share, name: str, work):
    """Run `work`; the other ranks then wait for rank 0's without the exchange's time limit (an
    evaluation can take longer than --dist-timeout; if rank 0 dies, torchrun stops them)."""
    out = work()
    if share.rank == 0:
        share.store.set(name, "done")
    else:
        share.store.wait([name], EVAL_WAIT)
    return out


def kill_hook(share: Share, step: int) -> None:
    """PRGE_KILL_AT="RANK:STEP" SIGKILLs that rank after that step in a run's first attempt (fault tests)."""
    spec = os.environ.get("PRGE_KILL_AT")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        rank, at = map(int, spec.split(":"))
        if rank == share.rank and at == step:
            os.kill(os.getpid(), signal.SIGKILL)


def _drift_hook(share: Share, params: list[torch.Tensor], step: int) -> None:
    """PRGE_DRIFT_AT="RANK:STEP" nudges that rank's first trained tensor after that step (the drift test)."""
    spec = os.environ.get("PRGE_DRIFT_AT")
    if spec:
        rank, at = map(int, spec.split(":"))
        if rank == share.rank and at == step:
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-6


@dataclass
class DistStepper:
    """`prge.run.loop.Stepper` for one rank: the eager step on this rank's queries; rank 0 evaluates and saves."""

    inner: object  # prge.run.train.EagerStepper over a Setup whose `share` is set
    share: Share
    check_every: int
    lora: list[torch.Tensor] = field(default_factory=list)  # every LoRA tensor (A and B): what rank 0 broadcasts

    @property
    def rank0(self) -> bool:
        return self.share.rank == 0

    def start(self):
        self.broadcast_weights()
        return after_rank0(self.share, "start", self.inner.start if self.rank0 else lambda: (None, None))

    def step(self, step: int):
        try:
            out = self.inner.step(step)
        except PrgeError as e:  # a non-finite loss: every rank has the same losses, rank 0 says it
            raise quiet_off_rank0(self.share, e)
        kill_hook(self.share, step)
        _drift_hook(self.share, self.inner.s.params, step)
        if self.check_every and step % self.check_every == 0:
            check_in_step(self.share, self.inner.s.params, step)
        return out

    def evaluate(self, step: int):
        return after_rank0(self.share, f"eval{step}", lambda: self.inner.evaluate(step) if self.rank0 else None)

    def save(self, folder: Path, step: int, state: dict) -> None:
        if self.rank0:
            self.inner.save(folder, step, state)

    def load(self, folder: Path) -> dict:
        """Rank 0 reads the checkpoint (its adapter was loaded by `prepare`); every rank gets its tensors and state."""
        state = [self.inner.load(folder) if self.rank0 else None]
        dist.broadcast_object_list(state, src=0)
        self.broadcast_weights()
        return state[0]

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        for t in self.lora:
            dist.broadcast(t.data, src=0)


def resume_point(share: Share, cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """(run folder, checkpoint) to continue from: --resume, or after a torchrun restart rank 0's checkpoints/last in --out."""
    from prge.run.train import resolve_resume

    if cfg.resume:
        return resolve_resume(cfg.resume) if share.rank == 0 else (Path(cfg.resume), Path(cfg.resume))
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    found = [None]
    if share.rank == 0 and restarted and cfg.out and (Path(cfg.out) / "checkpoints" / "last" / "trainer_state.json").is_file():
        found = [str(io.resolve_dir(Path(cfg.out) / "checkpoints" / "last"))]
    dist.broadcast_object_list(found, src=0)
    return (Path(cfg.out), Path(found[0])) if found[0] else (None, None)


def run(cfg: TrainConfig, stop_after: int | None = None) -> dict | None:
    """`prge.run.train.run` for one rank of a torchrun job; rank 0 returns the summary, the others None."""
    from prge.run.train import EagerStepper, finish, prepare
    from prge.run.plot import plot
    from prge.zo.lora import lora_layers

    share = start(cfg)
    try:
        rank0 = share.rank == 0
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and not cfg.out and not cfg.resume:
            raise quiet_off_rank0(share, PrgeError("torchrun --max-restarts needs a fixed run folder to restart from",
                                                   "pass --out DIR"))
        run_dir, ckpt = resume_point(share, cfg)
        s = prepare(cfg, adapter=str(ckpt) if ckpt is not None and rank0 else None)
        check_same_setup(share, cfg, s)
        run_dir = Path(run_dir or cfg.out or f"runs/{s.data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        if rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            io.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
            split = (f"{cfg.batch_size // share.world} of {cfg.batch_size} examples" if share.data else
                     f"{cfg.q // share.world} of {cfg.q} queries")
            say(f"prge: {cfg.method} ({cfg.mode}) on {s.data_name}, model {cfg.model}, {share.world} processes x "
                f"{split}, {sum(p.numel() for p in s.params):,} trained values, "
                f"{len(s.train)} train / {len(s.dev)} dev / {len(s.test)} test examples -> {run_dir}")
        lora = [t for m in lora_layers(s.model).values() for t in (m.lora_A, m.lora_B)]
        share.loss = s.loss_kind
        s.share = share
        stepper = DistStepper(EagerStepper(s), share, cfg.check_every, lora)
        plan = Plan(cfg.steps, cfg.eval_every, cfg.checkpoint_every, cfg.progress and rank0, "train", stop_after, record=rank0)
        state = loop.train(stepper, plan, run_dir, ckpt, log=say if rank0 else None,
                           on_eval=lambda step, ev: plot(run_dir / "metrics.jsonl", run_dir / "curves.png"))
        check_in_step(share, s.params, state["end"])
        if state["stopped"]:
            return {"stopped_at": state["end"], "run_dir": str(run_dir)} if rank0 else None
        return finish(s, run_dir, state, state["seconds"]) if rank0 else None
    finally:
        dist.destroy_process_group()
