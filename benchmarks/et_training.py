#!/usr/bin/env python
"""(e) ExecuTorch's own first-order training of the same LoRA-FA model: seconds per SGD step, peak RSS.

What runs: the model of the other benchmark variants (`build(config, rank)` of benchmarks/bench_models.py:
HF Llama, MP-LoRA r = 8 / alpha 16 on all 7 projections, the clean B: the
plain single-copy LoRA forward), wrapped in `LossModule`, whose forward(input_ids, target_pos,
target_ids, target_mask, label) — the five tensors of `Batch.tensors()` — returns the scalar
classification loss of `prge.zo.loss.copy_losses(..., copies=1, loss="class")` (CE over the 2 label words
at the answer position, the loss every other variant computes). Only the LoRA B matrices (14 on tiny,
28 on small) have requires_grad=True; base weights, the frozen A and the embeddings are frozen parameters.

The flow (executorch 1.5.1, torch 2.13; the "training" API is marked experimental in both):

  torch.export.export(LossModule, example inputs, strict=False)
  torch.export.experimental._export_forward_backward(ep)        # joint fwd+bwd graph, core-ATen
      -> outputs [loss, d loss/d B for every trainable B]     #   decomposed (linear -> permute+mm)
  fix_joint_graph(ep)                                           # trap 1 below
  to_edge(ep)  -> .transform([RemoveCloneOpsTransform()])       # trap 2 below
               -> .to_backend(XnnpackPartitioner(force_non_static_weights_for_f32_linear=True))
                                                                # XNNPACK: yes, it works (trap 5)
  .to_executorch()            # weights_to_outputs_pass appends the trainable B themselves as outputs
                              # and memory-plans them as mutable state, plus 3 metadata methods
                              # (__et_training_gradients_index_forward, ..._parameters_index_..., ..._fqn_...)
  runtime: executorch.extension.training._load_for_executorch_for_training(pte) -> TrainingModule
           .forward_backward("forward", inputs) -> [loss]; .named_gradients(); .named_parameters()
           get_sgd_optimizer(named_parameters, lr).step(named_gradients)   # updates B in place

One .pte, no .ptd: `ExecutorchBackendConfig(external_mutable_weights=True)` would put the trainable
weights in a .ptd (the CIFAR example's option); not needed for timing.

Traps found (each reproduced, with the fix used):

1. `aten::empty_permuted.out` has no ExecuTorch kernel. The joint graph's silu backward
   (core_aten_decompositions of `silu_backward`) is `full_like(empty_permuted(size, [0, 1, ..]), 1)`.
   to_edge and to_executorch accept it, but loading the program fails with
   "Missing operator: aten::empty_permuted.out" and forward_backward raises
   "Failed to execute method forward, error: 0x14". Fix (`fix_joint_graph`): rewrite every
   empty_permuted with an identity layout as `aten.full(size, 0.0, dtype)` before to_edge
   (its contents are never read: full_like overwrites them).
2. XNNPACK lowering of the joint graph fails in XnnpackBackend.preprocess with
   "RuntimeError: Output node 'aten__softmax_default' is already in the inputs. This is likely due to
   pass through arguments, which are not supported in XNNPACK Delegate." The attention softmax
   output is saved for the backward (`_softmax_backward_data` decomposes to softmax·(g − Σ softmax·g)),
   so the partition holding `softmax -> _clone_dim_order` (the clone before `attn @ V`) returns both
   the softmax and its clone; XNNPACK's own passes drop the identity clone, the partition then returns
   the same value twice, and the duplicate output trips that check (the message says "inputs" but it
   is the duplicate output). Fix: run exir's `RemoveCloneOpsTransform` (identity clones only) on the
   edge program before partitioning, i.e. to_edge -> transform -> to_backend instead of
   to_edge_transform_and_lower (nothing is lost: the joint graph is already decomposed, there is no
   `linear` left for to_edge_transform_and_lower to preserve). Removing `aten.clone` at the ATen level
   instead is wrong: a later `view` needs the contiguous copy ("Cannot view a tensor with shape
   [4, 2, 2, 64, 16] ...").
3. TrainingModule.named_parameters() is only available after the first forward_backward
   (the runtime API says "This will be fixed in a later version"), so the optimizer is created after
   the first step's forward_backward.
4. Every forward_backward also runs the 3 metadata methods and clones the loss and every gradient
   (that is the Python TrainingModule; a C++ host could skip it) — part of the timed step here.
5. With the default XnnpackPartitioner() every matrix multiply stays on the portable backend (91 of 91
   `aten.mm` on "tiny"): `_export_forward_backward` decomposes each linear into permute + mm, and
   XNNPACK's MMConfig takes an mm only when its weight operand is a static parameter ("Expected weight
   to be a static param"), never a permute of one — and the backward's mm have activations on both
   sides anyway. `force_non_static_weights_for_f32_linear=True` makes the GEMM configs take fp32
   weights as dynamic inputs: then all mm (forward and backward) run in XNNPACK (tiny: 51 delegate
   calls, 0 mm outside; 84 calls and 91 portable mm without it). Frozen weights are then not pre-packed
   by XNNPACK, and the trainable B can never be baked into a delegate as a constant.
   `--backend xnnpack-static` keeps the default partitioner, `--backend portable` uses no delegate.
   What stays outside XNNPACK either way: elementwise ops XNNPACK's partitioner does not take in this
   graph (mul.Scalar, pow, expand_copy, slice_scatter, sum, alias_copy, full, the RoPE / mask ops).

The trainable B are not captured as XNNPACK constants: the ET and eager loss trajectories over 10 SGD
steps agree to ~1e-6 (a delegate holding a stale copy of B would diverge at step 2). The export worker
checks this (`check_*` fields) along with ET vs eager loss and gradients at the start.

    OMP_NUM_THREADS=1 python benchmarks/et_training.py --config tiny --b 4
    OMP_NUM_THREADS=1 python benchmarks/et_training.py --config small --b 4
    OMP_NUM_THREADS=1 python benchmarks/et_training.py --config tiny --backend portable   # no XNNPACK
    OMP_NUM_THREADS=1 python benchmarks/et_training.py --config tiny --backend xnnpack-static

Measured here (2 shared cores, 1 thread, load average 2-3, b = 4; medians of 5 steps, lr 1e-3):
  tiny  (T 64):  xnnpack 0.0065 s/step, xnnpack-static 0.0071, portable 0.019; peak RSS ~370 MB
                 (import floor); .pte 0.65 MB; export ~30-45 s
  small (T 128): xnnpack 0.38 s/step, xnnpack-static 0.88 (mm on portable); peak RSS 615 MB;
                 .pte 68.4 MB (the fp32 weights are inside); export 67 s, export peak RSS 1.3 GB

Export and training run in separate subprocesses (benchmarks/workers.py, the harness of speed.py
too), so the training peak RSS, `ru_maxrss`, is only loading the program and stepping it (~350 MB
of it is importing torch and executorch); the program is cached under --work. The last line printed is "RESULT {json}".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import workers  # noqa: E402
from benchmarks.bench_models import CONFIGS, batch, build  # noqa: E402
from benchmarks.workers import report, set_threads  # noqa: E402

import torch
from torch import nn

BACKENDS = ("xnnpack", "xnnpack-static", "portable")


class LossModule(nn.Module):
    """forward(*Batch.tensors()) -> the scalar class loss of prge.zo.loss.copy_losses (copies=1)."""

    def __init__(self, model: nn.Module, label_ids):
        super().__init__()
        self.model = model
        self.register_buffer("label_ids", torch.as_tensor(label_ids, dtype=torch.long))

    def forward(self, input_ids, target_pos, target_ids, target_mask, label):
        from prge.data.batch import Batch
        from prge.zo.loss import copy_losses

        b = Batch(input_ids, target_pos, target_ids, target_mask, label)
        return copy_losses(self.model, b, 1, self.label_ids, "class")[0]


def prepare(model: nn.Module, label_ids) -> LossModule:
    """The loss module, with ONLY the LoRA B matrices trainable and every layer using the clean B."""
    from prge.zo.lora import lora_layers

    b_params = {id(m.lora_B) for m in lora_layers(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in b_params)
    return LossModule(model, label_ids).eval()


def fix_joint_graph(ep):
    """Trap 1: `empty_permuted` (no ExecuTorch kernel) -> `full(size, 0)`. Returns the count."""
    n_fixed = 0
    for n in list(ep.graph.nodes):
        if n.op == "call_function" and n.target == torch.ops.aten.empty_permuted.default:
            size, layout = n.args[:2]
            if list(layout) != list(range(len(size))):
                raise RuntimeError(f"empty_permuted with a non-identity layout {layout}: not handled")
            n.target = torch.ops.aten.full.default
            n.args = (size, 0.0)
            n.kwargs = {"dtype": n.kwargs.get("dtype")}
            n_fixed += 1
    ep.graph_module.recompile()
    return n_fixed


def example_inputs(b: int, T: int, K: int = 1) -> tuple:
    # distinct tensor objects: torch.export treats one object passed twice as one input
    return (torch.zeros(b, T, dtype=torch.long), torch.zeros(b, K, dtype=torch.long), torch.zeros(b, K, dtype=torch.long),
            torch.ones(b, K), torch.zeros(b, dtype=torch.long))


def export_training(model: nn.Module, label_ids, b: int, T: int, out_path, log=print, backend: str = "xnnpack") -> dict:
    """Export the joint forward-backward LoRA-B training program of `model` as `out_path` (.pte)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    out_path = Path(out_path)
    core = prepare(model, label_ids)
    trainable = {n: p.numel() for n, p in core.named_parameters() if p.requires_grad}
    t0 = time.time()
    ep = torch.export.export(core, example_inputs(b, T), strict=False)
    t_export = time.time() - t0
    ep = _export_forward_backward(ep)
    t_joint = time.time() - t0
    n_fixed = fix_joint_graph(ep)
    n_grads = sum(1 for s in ep.graph_signature.output_specs if s.kind.name == "GRADIENT_TO_PARAMETER")
    log(f"export {t_export:.1f} s, joint graph {t_joint - t_export:.1f} s: {n_grads} gradients, "
        f"{n_fixed} empty_permuted rewritten")
    edge = to_edge(ep, compile_config=EdgeCompileConfig())
    if backend.startswith("xnnpack"):
        from executorch.backends.transforms.remove_clone_ops import RemoveCloneOpsTransform
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        edge = edge.transform([RemoveCloneOpsTransform()])  # trap 2
        # trap 5: see the module docstring
        edge = edge.to_backend(XnnpackPartitioner(force_non_static_weights_for_f32_linear=backend == "xnnpack"))
    g = edge.exported_program().graph
    ops = collections.Counter(str(getattr(n.target, "__name__", n.target)) for n in g.nodes if n.op == "call_function")
    n_delegates = ops.pop("executorch_call_delegate", 0)
    ops.pop("getitem", None)  # unpacking of delegate outputs
    t_edge = time.time() - t0
    log(f"to_edge{' + ' + backend if backend != 'portable' else ''} {t_edge - t_joint:.1f} s: {n_delegates} delegate calls, "
        f"{sum(ops.values())} ops left outside")
    et = edge.to_executorch(ExecutorchBackendConfig())
    data = et.buffer
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    export_s = time.time() - t0
    log(f"to_executorch {export_s - t_edge:.1f} s; {out_path} {len(data) / 1e6:.2f} MB")
    info = {"export_s": export_s, "pte_mb": len(data) / 1e6, "ptd": None, "backend": backend,
            "api": "torch.export.experimental._export_forward_backward + executorch.extension.training",
            "b": b, "T": T, "n_trainable_tensors": len(trainable), "n_trainable": sum(trainable.values()),
            "n_gradients": n_grads, "n_delegate_calls": n_delegates, "n_ops_outside_delegates": sum(ops.values()),
            "ops_outside_delegates_top": dict(ops.most_common(12)), "empty_permuted_rewritten": n_fixed}
    return info


def _load(pte_path):
    from executorch.extension.training import _load_for_executorch_for_training

    return _load_for_executorch_for_training(str(pte_path))


def train_steps(pte_path, batch, steps: int, warmup: int, lr: float, losses: list | None = None) -> list[float]:
    """Load the program, run warmup + steps SGD steps (forward_backward + optimizer step) on `batch`;
    return the seconds of the `steps` timed ones (losses, if given a list, gets every step's loss)."""
    from executorch.extension.training import get_sgd_optimizer

    mod = _load(pte_path)
    inputs = list(batch.tensors())
    opt, times = None, []
    for step in range(warmup + steps):
        t = time.perf_counter()
        loss = mod.forward_backward("forward", inputs)[0]
        if opt is None:  # trap 3: named_parameters() exists only after the first forward_backward
            opt = get_sgd_optimizer(mod.named_parameters(), lr)
        opt.step(mod.named_gradients())
        if step >= warmup:
            times.append(time.perf_counter() - t)
        if losses is not None:
            losses.append(float(loss))
    return times


def check_against_eager(pte_path, model: nn.Module, label_ids, batch, steps: int, lr: float, log=print) -> dict:
    """ET vs eager: loss and every gradient at the start, then both loss trajectories of `steps` SGD steps.

    Runs on a deep copy of the model (the caller's B are untouched)."""
    import copy

    core = prepare(copy.deepcopy(model), label_ids)
    params = dict((n, p) for n, p in core.named_parameters() if p.requires_grad)
    mod = _load(pte_path)
    et_loss = float(mod.forward_backward("forward", list(batch.tensors()))[0])
    et_grads = mod.named_gradients()
    loss = core(*batch.tensors())
    loss.backward()
    eager_start = float(loss)
    # the program names parameters by their FQN in LossModule ("model.model.layers...")
    missing = set(params) ^ set(et_grads)
    if missing:
        raise RuntimeError(f"ET gradient names differ from the eager ones: {sorted(missing)[:4]}")
    grad_err = max(float((et_grads[n] - p.grad).abs().max()) for n, p in params.items())
    grad_max = max(float(p.grad.abs().max()) for p in params.values())
    log(f"start: ET loss {et_loss:.6f}, eager {eager_start:.6f}; max |grad diff| {grad_err:.2e} (max |grad| {grad_max:.2e})")
    et_losses = []
    train_steps(pte_path, batch, steps, 0, lr, losses=et_losses)
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    eager_losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = core(*batch.tensors())
        loss.backward()
        opt.step()
        eager_losses.append(float(loss))
    traj_err = max(abs(a - e) for a, e in zip(et_losses, eager_losses))
    log(f"{steps} SGD steps at lr {lr} on one fixed batch: ET losses " + " ".join(f"{x:.4f}" for x in et_losses))
    log(f"{'':>{len(str(steps)) + 35}}eager      " + " ".join(f"{x:.4f}" for x in eager_losses))
    return {"check_lr": lr, "check_losses_et": et_losses, "check_losses_eager": eager_losses,
            "check_loss_decreases": et_losses[-1] < et_losses[0], "check_traj_max_abs_diff": traj_err,
            "check_start_loss_diff": abs(et_loss - eager_start),
            "check_grad_max_abs_diff": grad_err, "check_grad_max_abs": grad_max}


# ------------------------------------------------------------------------------------------------
# workers (subprocesses, so each peak RSS is its own) and the driver


def pte_path(args) -> Path:
    return Path(args.work) / f"{args.config}-et-training-b{args.b}-r{args.rank}-{args.backend}.pte"


def _vocab(config: str, model=None) -> int:
    return CONFIGS[config].get("vocab_size") or model.config.vocab_size


def worker_export(args) -> dict:
    model, tok, label_ids = build(args.config, args.rank)
    T = CONFIGS[args.config]["T"]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    info = export_training(model, label_ids, args.b, T, pte_path(args), log=log, backend=args.backend)
    bt = batch(args.config, args.b, model.config.vocab_size)
    info.update(check_against_eager(pte_path(args), model, label_ids, bt, args.check_steps, args.check_lr, log=log))
    info["vocab_size"] = model.config.vocab_size
    Path(str(pte_path(args)) + ".json").write_text(json.dumps(info, indent=1))
    return info


def worker_train(args) -> dict:
    info = json.loads(Path(str(pte_path(args)) + ".json").read_text())
    bt = batch(args.config, args.b, info["vocab_size"])
    losses = []
    times = train_steps(pte_path(args), bt, args.steps, args.warmup, args.lr, losses=losses)
    return {"s_step": statistics.median(times), "s_all": times, "losses": losses}


def run_worker(args) -> None:
    set_threads(args.threads)
    load_before = os.getloadavg()[0]
    report(worker_export(args) if args.worker == "export" else worker_train(args), load_before)


def spawn(args, worker: str) -> dict:
    cmd = ["--worker", worker, "--config", args.config, "--b", str(args.b), "--rank", str(args.rank),
           "--backend", args.backend, "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
           "--check-steps", str(args.check_steps), "--check-lr", str(args.check_lr), "--threads", str(args.threads),
           "--work", args.work]
    try:
        return workers.spawn(__file__, cmd, args.threads, verbose=args.verbose)
    except workers.WorkerFailed as e:
        raise SystemExit(f"{worker} on {args.config} failed: {e}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "small"],
                   help="model configuration (smollm2 is not supported here: too slow on this machine)")
    p.add_argument("--worker", choices=["export", "train"], help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, default=4, help="examples per step (the program's static batch)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    p.add_argument("--backend", default="xnnpack", choices=BACKENDS)
    p.add_argument("--steps", type=int, default=5, help="timed SGD steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of the timed run")
    p.add_argument("--check-steps", type=int, default=10, help="steps of the ET-vs-eager loss check after export")
    p.add_argument("--check-lr", type=float, default=0.5, help="SGD learning rate of that check (B starts at 0)")
    p.add_argument("--threads", type=int, default=1, help="torch and ExecuTorch threads (1 on a busy machine)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "prge" / "bench"), help="where programs are cached")
    p.add_argument("--reexport", action="store_true", help="export again even if a cached program exists")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    info = {}
    path = pte_path(args)
    if args.reexport or not path.is_file() or not Path(str(path) + ".json").is_file():
        print(f"[{args.config}] exporting the joint forward-backward graph ({args.backend}) ...", file=sys.stderr, flush=True)
        info = spawn(args, "export")
        print(f"[{args.config}] exported in {info['export_s']:.0f} s, .pte {info['pte_mb']:.2f} MB, "
              f"{info['n_delegate_calls']} XNNPACK delegate calls, {info['n_ops_outside_delegates']} ops outside; "
              f"export peak RSS {info['peak_rss_mb']:.0f} MB", flush=True)
        print(f"[{args.config}] check, {args.check_steps} SGD steps at lr {args.check_lr}: ET "
              + " ".join(f"{x:.4f}" for x in info["check_losses_et"])
              + f"; max |ET - eager| {info['check_traj_max_abs_diff']:.1e}, grads at start {info['check_grad_max_abs_diff']:.1e}",
              flush=True)
    else:
        info = json.loads(Path(str(path) + ".json").read_text())
        info["cached"] = True
    res = spawn(args, "train")
    print(f"[{args.config}] et-training ({args.backend}): {res['s_step']:.4f} s/step (median of {args.steps}), "
          f"peak RSS {res['peak_rss_mb']:.0f} MB; losses " + " ".join(f"{x:.4f}" for x in res["losses"]), flush=True)
    out = {"variant": "et-training", "config": args.config, "b": args.b, "T": CONFIGS[args.config]["T"], "rank": args.rank,
           "backend": args.backend, "threads": args.threads, "lr": args.lr, "s_step": res["s_step"], "s_all": res["s_all"],
           "peak_rss_mb": res["peak_rss_mb"], "load_avg_1min": res["load_avg_1min"], "pte": str(path),
           "pte_mb": info.get("pte_mb"), "export_s": info.get("export_s"), "export_peak_rss_mb": info.get("peak_rss_mb"),
           "cached_program": bool(info.get("cached")),
           **{k: v for k, v in info.items() if k.startswith("check_") or k.startswith("n_") or k in ("api", "ops_outside_delegates_top")}}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
