"""The whole P-RGE step as one method of an ExecuTorch program, run by an unmodified runtime.

`export_program` traces an MP-LoRA model (its LoRA layers already hold `copies` buffers of 2q
copies of B) into one `.pte` with these methods, all sharing the program's mutable buffers (the
2q copies of every B and the ε of the last step):

    train_step(input_ids, target_pos, target_ids, target_mask, label, lr, eps, g, key[, z]) -> losses (2q,)
        1. rebuild the clean B and the last step's noise from the copies: B = mean(B⁺ + B⁻)/2,
           z = (B⁺ − B⁻) / 2ε_prev                                        (estimator.rebuild)
        2. apply the pending update B ← B − lr · mean_i(g_i z_i)            (estimator.update)
        3. draw new noise z' for step `key` = [seed, step]                   (estimator.all_noise)
        4. write B⁺ = B + εz', B⁻ = B − εz' into the copies, store ε         (estimator.perturbed)
        5. one batched forward of the batch repeated 2q times; returns the 2q per-copy losses
    read_state(g, lr) -> B (total,)      clean B of every layer with the pending update folded in,
                                         flattened and concatenated in manifest["layers"] order
    read_raw() -> raw (2q·total + 1,)    the raw state (every layer's copies, then ε), for a
                                         bit-exact checkpoint
    write_raw(raw) -> eps                restore it
    evaluate(input_ids, target_pos, g, lr) -> label-word scores (N, L)          (classification)
    evaluate(input_ids, target_pos, target_ids, target_mask, g, lr) -> (loss_sum (N,), correct (N,))
                                         per-example summed answer CE and correct tokens (loss "lm")

    features(input_ids, target_pos, g, lr) -> (scores f32 (N,L), h f32 (N,H))   (classification)
                                         the head's label-word logits before any soft-cap, and the
                                         final hidden state at the answer position: what the label
                                         readout's host step (`prge.zo.readout.fit_features`) reads
    readout_step(f, base, y, b, key, eps, lr) -> b' f32 (L,R)            (classification, one process)
                                         one step of that readout on 16 cached rows (`prge.zo.readout.step`,
                                         R = manifest["readout"]["rank"]): the C++ runner's readout calls it
A program exported with `ranks` > 1 is one rank's part of an engine fleet (`StepProgram.fleet`,
`prge.engine.fleet`): train_step takes the rank's first global query id as a last input, a method
`update(g, lr, key)` applies the update from all q values of g, and the state is the clean B.

The host keeps only the step number and g_i = (L⁺_i − L⁻_i)/2ε (one scalar per query), computed
from the returned losses and passed to the next call; `prge.engine.runtime` is that loop. Everything
numeric is `prge.zo.estimator`, the same functions the eager trainer calls, so with `noise="counter"`
an engine run follows the eager trajectory (tests/test_export.py checks it).

Noise: "counter" (default): the hash-based generator keyed by (seed, step), identical to eager
training; "host": z (q, total) is an extra train_step input, drawn by the host (bit-exact with
eager); "engine": in-graph `torch.randn`, which the runtime seeds from std::random_device on every
call — runs cannot be reproduced, resumed exactly or compared with eager ones (opt-in only).

Shapes are static (batch b, length T, K answer slots, q queries fixed at export); sequences are
right-padded, with no attention mask (causal attention keeps the pads away from real positions)
and the loss masked. Beside `X.pte` the exporter writes `X.pte.json` (the manifest: everything a
host needs to feed the program and to refuse data made for another one) and
`X.pte.adapter.safetensors` (the frozen A matrices, so the device loop can write a PEFT adapter
without the model). `write_dataset` pre-tokenises data for a program (see its docstring).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import prge
from prge.zo import estimator as est
from prge.zo import readout as ro
from prge import io
from prge.data.batch import Batch
from prge.engine.formats import (CONSTANT_METHODS, FORMAT, FORMAT_VERSION, IDENTITY, METHODS, check_eps, quantized_min_eps,
                                  identity_sha256, lora_a_path, manifest_path, seal)
from prge.errors import PrgeError
from prge.zo.lora import lora_layers, set_copies, using
from prge.zo.loss import copy_losses, cross_entropy, head, hidden_at, label_head, label_scores

NOISE_MODES = ("counter", "host", "engine")
QUANTIZE_MODES = (None, "8da4w", "8da8w")
LOSSES = ("class", "lm")
# model_type of the families whose export is tested against eager training (tests/test_families.py)
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "opt", "gpt2")
# buffers the program mutates; InitializedMutableBufferPass matches these against placeholder names,
# which torch.export lower-cases (a pattern such as "lora_B" would silently match nothing)
STATE_PATTERNS = ["copies", "eps_prev", "clean_"]
# train_step draws its noise in runs of layers of at most this many values (8 MB of z; SmolLM2-135M at
# q = 4: 5 runs of 6 layers), so the draw's intermediates stay below the forward's planned memory
NOISE_CHUNK_VALUES = 1 << 21


def vocab_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def layer_table(model: nn.Module) -> list[dict]:
    """[{name, shape (out, r), offset}] in the order the program concatenates the B tensors."""
    out, offset = [], 0
    for name, m in lora_layers(model).items():
        out.append({"name": name, "shape": [m.out_features, m.rank], "offset": offset})
        offset += m.out_features * m.rank
    return out


def model_meta(model: nn.Module, tokenizer, model_name: str | None = None) -> dict:
    """The identity fields of a model + tokenizer, to `check_manifest` a program against them."""
    meta = {"vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256(tokenizer), "pad_id": tokenizer.pad_token_id}
    if model_name is not None:
        meta["model"] = model_name
    if lora_layers(model):
        meta["layers"] = layer_table(model)
    return meta


# ------------------------------------------------------------------------------------------------
# the exported module


class StepProgram(nn.Module):
    """The MP-LoRA model plus the step's own state (ε of the last step), one Python method per
    exported method; `self.method` picks which one `forward` is while tracing."""

    def __init__(self, model: nn.Module, label_ids: torch.Tensor | None, q: int, loss: str, noise: str, ranks: int = 1):
        super().__init__()
        self.model = model
        # q: the queries this program evaluates (its copies are 2q); q_global: all the step's queries
        # (a fleet program's update uses all of them); ranks > 1 makes a fleet program (see `fleet`)
        self.q, self.q_global, self.ranks, self.loss, self.noise = q // ranks, q, ranks, loss, noise
        self.shapes = [tuple(m.copies.shape[1:]) for m in lora_layers(model).values()]
        # ε of the previous step, to rebuild z from the copies. 1, not 0: the first call divides by
        # it (the copies are then all equal, so z = 0 and the g = 0 update is a no-op).
        self.register_buffer("eps_prev", torch.ones(1))
        if ranks > 1:  # the fleet keeps the clean B itself: its copies hold only this rank's queries
            for j, m in enumerate(lora_layers(model).values()):
                self.register_buffer(f"clean_{j}", m.copies[0].detach().clone())
        self.label_ids = None if label_ids is None else torch.as_tensor(label_ids, dtype=torch.long).clone()
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.method = "train_step"

    def forward(self, *args):
        return getattr(self, self.method)(*args)

    def _layers(self):
        return list(lora_layers(self.model).values())

    @property
    def fleet(self) -> bool:
        """A program for one rank of several (`prge export --ranks N`): train_step takes the rank's
        first global query id and perturbs only its q/N queries; the update from all q values of g is
        its own method (`update`), which regenerates every query's noise from the step's key, so every
        rank applies the same update to the clean B it keeps (buffers clean_j). g and lr, which a
        single-process program folds in as the pending update, are accepted and ignored."""
        return self.ranks > 1

    def _cleans(self) -> list[torch.Tensor]:
        return [getattr(self, f"clean_{j}") for j in range(len(self.shapes))]

    def _clean(self, g: torch.Tensor, lr: torch.Tensor) -> list[torch.Tensor]:
        """Clean B of every layer with the pending update (g of the last step) applied."""
        if self.fleet:  # updated by `update` already; + 0·lr keeps the ignored (always finite) input in the graph
            return [c + 0.0 * lr for c in self._cleans()]
        out = []
        for m in self._layers():
            b, z = est.rebuild(m.copies, self.eps_prev)
            out.append(est.update(b, z, g, lr))
        return out

    def _noise(self, key: torch.Tensor, z: torch.Tensor | None, js: list[int]) -> list[torch.Tensor]:
        """The new noise of layers `js`; z is the host's noise (q, total), or a fleet rank's first query id."""
        if self.fleet:
            return est.all_noise(key, self.q, self.shapes, first=z, tensors=js)
        if self.noise == "counter":
            return est.all_noise(key, self.q, self.shapes, tensors=js)
        if self.noise == "engine":
            return [torch.randn(self.q, *self.shapes[j]) for j in js]
        # the host's z (q, total): slice only these layers' columns (a split would copy all of z per run)
        starts = [0, *itertools.accumulate(math.prod(s) for s in self.shapes)]
        return [z[:, starts[j]:starts[j + 1]].reshape(self.q, *self.shapes[j]) for j in js]

    def train_step(self, input_ids, target_pos, target_ids, target_mask, label, lr, eps, g, key, z=None):
        clean, layers = self._clean(g, lr), self._layers()
        # planned memory: the noise is drawn a few layers at a time, each layer's copies written in
        # place (`_write`); the next run's draw and the forward start only once those are written
        # (`_after`), so no delegate call holds two runs' noise at once
        for js in est.noise_chunks(self.q, self.shapes, NOISE_CHUNK_VALUES):
            for j, zz in zip(js, self._noise(key, z, js)):
                _write(layers[j].copies, est.perturbed(clean[j], zz, eps, "+-"))
            key = _after(key, [layers[j].copies for j in js])
        self.eps_prev.copy_(eps)
        input_ids = _after(input_ids, [m.copies for m in layers])
        return self._copy_losses(Batch(input_ids, target_pos, target_ids, target_mask, label), "copies")

    def forward_losses(self, input_ids, target_pos, target_ids, target_mask, label):
        """The same batched forward over the 2q copies as train_step, without the ZO arithmetic
        (what `benchmarks/speed.py` compares the step against)."""
        return self._copy_losses(Batch(input_ids, target_pos, target_ids, target_mask, label), "copies")

    def _copy_losses(self, batch: Batch, which) -> torch.Tensor:
        c = 2 * self.q
        with using(self.model, which):
            return copy_losses(self.model, batch.repeat(c), c, self.label_ids if self.loss == "class" else None, self.loss)

    def read_state(self, g, lr):
        return torch.cat([b.reshape(-1) for b in self._clean(g, lr)])

    def update(self, g, lr, key):
        """Fleet only: B ← B − lr·mean_i(g_i z_i) over all q_global queries of step `key`, their noise
        regenerated here (estimator.all_noise/update, as the eager step does); returns lr."""
        for c, z in zip(self._cleans(), est.all_noise(key, self.q_global, self.shapes)):
            c.copy_(est.update(c, z, g, lr))
        return lr * 1.0

    def _state(self) -> list[torch.Tensor]:
        """What holds the trained values: the clean B (fleet), else the ± copies."""
        return self._cleans() if self.fleet else [m.copies for m in self._layers()]

    def read_raw(self):
        # one derived vector (never a buffer itself: XNNPACK refuses that, and a lone scalar op on
        # unmutated buffers trips an ExecuTorch constant-naming bug)
        return torch.cat([t.reshape(-1) for t in self._state()] + [self.eps_prev])

    def write_raw(self, raw):
        start = 0
        for t in self._state():
            n = t.numel()
            _write(t, raw[start:start + n].reshape(t.shape))
            start += n
        self.eps_prev.copy_(raw[start:start + 1])
        return raw[start:start + 1] * 1.0

    def evaluate_class(self, input_ids, target_pos, g, lr):
        with using(self.model, [b[None] for b in self._clean(g, lr)]):
            return label_scores(self.model, Batch(input_ids, target_pos, None, None, None), self.label_ids)

    def features(self, input_ids, target_pos, g, lr):
        with using(self.model, [b[None] for b in self._clean(g, lr)]):
            h = hidden_at(self.model, input_ids, target_pos)[:, 0].float()
            return label_head(self.model, h, self.label_ids), h

    def readout_step(self, f, base, y, b, key, eps, lr):
        return ro.step(b, f, base, y, key, self.q, eps, lr, self.softcap)

    def evaluate_lm(self, input_ids, target_pos, target_ids, target_mask, g, lr):
        with using(self.model, [b[None] for b in self._clean(g, lr)]):
            h = hidden_at(self.model, input_ids, target_pos)
            logits = head(self.model, h)
            ce = (cross_entropy(logits, target_ids) * target_mask).sum(1)
            correct = ((logits.argmax(-1) == target_ids).float() * target_mask).sum(1)
            return ce, correct


def _write(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """buffer[:] = value, kept in place in the program. `buffer.copy_(value)` would be functionalised
    into a new tensor that ExecuTorch writes back to the buffer only at the end of the method, so the
    planned memory would hold the state twice (the 2q copies of B: 80 MB for SmolLM2-135M at q = 4);
    an index_put_ over every row is what the reinplace pass (`lower`) turns back into a write in place."""
    buffer.index_put_((torch.arange(buffer.shape[0]),), value)


def _after(x: torch.Tensor, written: list[torch.Tensor]) -> torch.Tensor:
    """x (an int64 input), made to depend on one element of each tensor in `written` (+ 0).

    XNNPACK merges independent float ops into the forward's delegate calls, so without this the
    perturbation of layer k ran inside the forward's call for an earlier layer, and every layer's noise
    stayed in the planned memory into the forward (1.3 MB a layer for SmolLM2 at q = 4). With the
    forward's input depending on every write, no delegate call can hold both, and the noise is freed
    before the forward starts. `== 0` then `* 0` keeps it 0 whatever the values (NaN included)."""
    return x + (torch.stack([w.reshape(-1)[0] for w in written]) == 0).long().sum() * 0


def _example_inputs(q: int, b: int, T: int, K: int, total: int, n_eval: int, loss: str, noise: str,
                    with_labels: bool, ranks: int = 1, labels: int = 0, readout_rank: int = 0) -> dict[str, tuple]:
    def batch(n):
        return (torch.zeros(n, T, dtype=torch.long), torch.zeros(n, K, dtype=torch.long),
                torch.zeros(n, K, dtype=torch.long), torch.ones(n, K), torch.zeros(n, dtype=torch.long))

    # distinct tensor objects for every input: torch.export treats one object passed twice as one input
    def scalar():
        return torch.full((1,), 1e-3)

    g = torch.zeros(q)
    key = torch.zeros(2, dtype=torch.long)
    extra = (torch.zeros(1, dtype=torch.long),) if ranks > 1 else (torch.zeros(q, total),) if noise == "host" else ()
    step = batch(b) + (scalar(), scalar(), g, key) + extra
    inputs = {
        "train_step": step,
        "read_state": (torch.zeros(q), scalar()),
        "read_raw": (),
        "write_raw": (torch.ones(raw_size(q, total, ranks)),),
        "update": (torch.zeros(q), scalar(), torch.zeros(2, dtype=torch.long)),
    }
    ev = batch(n_eval)
    if with_labels:
        inputs["evaluate"] = (ev[0], ev[1][:, :1].clone(), torch.zeros(q), scalar())
        inputs["features"] = (ev[0].clone(), ev[1][:, :1].clone(), torch.zeros(q), scalar())
        n = ro.BATCH
        inputs["readout_step"] = (torch.zeros(n, readout_rank), torch.zeros(n, labels), torch.zeros(n, dtype=torch.long),
                                  torch.zeros(labels, readout_rank), torch.zeros(2, dtype=torch.long), scalar(), scalar())
    else:
        inputs["evaluate"] = (ev[0], ev[1], ev[2], ev[3], torch.zeros(q), scalar())
    inputs["forward_losses"] = batch(b)
    return inputs


def raw_size(q: int, total: int, ranks: int = 1) -> int:
    """Length of read_raw's vector: the 2q copies of every B and ε, or a fleet program's clean B and ε."""
    return (total if ranks > 1 else 2 * q * total) + 1


FLEET_SIGNATURES = {  # where a fleet program's methods differ (`StepProgram.fleet`)
    "train_step": "(input_ids i64 (b,T), target_pos i64 (b,K), target_ids i64 (b,K), target_mask f32 (b,K), "
                  "label i64 (b,), lr f32 (1,) ignored, eps f32 (1,), g f32 (q,) ignored, key i64 (2,) = [seed, step], "
                  "first_query i64 (1,)) -> losses f32 (2q/ranks,): L+ of the rank's queries, then their L-",
    "update": "(g f32 (q,), lr f32 (1,), key i64 (2,) = [seed, step]) -> lr f32 (1,): B <- B - lr * mean_i g_i z_i "
              "over all q queries of the step, their noise regenerated",
    "read_raw": "() -> raw f32 (total+1,): the clean B of every layer flattened, in layer order, then eps",
    "write_raw": "(raw f32 (total+1,) as read_raw returns it) -> eps f32 (1,)",
}

METHOD_SIGNATURES = {
    "train_step": "(input_ids i64 (b,T), target_pos i64 (b,K), target_ids i64 (b,K), target_mask f32 (b,K), "
                  "label i64 (b,), lr f32 (1,), eps f32 (1,), g f32 (q,), key i64 (2,) = [seed, step][, z f32 (q,total)]) "
                  "-> losses f32 (2q,): L+ of queries 1..q, then L- of queries 1..q",
    "read_state": "(g f32 (q,), lr f32 (1,)) -> B f32 (total,): clean B of every layer, pending update folded in",
    "read_raw": "() -> raw f32 (2q*total+1,): each layer's copies (2q,out,r) flattened, in layer order, then eps",
    "write_raw": "(raw f32 (2q*total+1,) as read_raw returns it) -> eps f32 (1,)",
    "evaluate_class": "(input_ids i64 (N,T), target_pos i64 (N,1), g f32 (q,), lr f32 (1,)) -> scores f32 (N,L)",
    "evaluate_lm": "(input_ids i64 (N,T), target_pos i64 (N,K), target_ids i64 (N,K), target_mask f32 (N,K), "
                   "g f32 (q,), lr f32 (1,)) -> (ce_sum f32 (N,), correct f32 (N,))",
    "forward_losses": "(input_ids, target_pos, target_ids, target_mask, label as train_step) -> losses f32 (2q,)",
    "features": "(input_ids i64 (N,T), target_pos i64 (N,1), g f32 (q,), lr f32 (1,)) -> (scores f32 (N,L) before any "
                "soft-cap, h f32 (N,H) the final hidden state at the answer position)",
    "readout_step": "(f f32 (16,R) = A h of 16 cached rows, base f32 (16,L) their features scores, y i64 (16,) labels, "
                    "b f32 (L,R), key i64 (2,) = [seed, readout step], eps f32 (1,), lr f32 (1,)) -> b f32 (L,R) after one "
                    "zeroth-order step of the label readout (prge.zo.readout.step)",
}


# how 8da4w chooses each group's int4 scale: HQQ's scale-only fit (torchao's `hqq_scale_only`) instead of
# max-abs ("affine"). Both are symmetric, which is what XNNPACK's blockwise int4 kernels take (an asymmetric
# int4 weight lowers to the same delegate with its zero points dropped: its outputs are wrong, so it is not
# offered). On SmolLM2-135M, SST-2's earlier prompt, 200 dev rows, eager torchao: fp32 76.5%, affine 69.5%,
# hqq 74.0% zero-shot (`python benchmarks/quantized.py zero-shot-eager`, README "Quantised programs").
INT4_QPARAMS = "hqq_scale_only"


def _quantize(model: nn.Module, mode: str, int4_qparams: str = INT4_QPARAMS) -> nn.Module:
    """Quantise the frozen base linears (not LoRA A/B, not the LM head, which may be tied to the
    embeddings) with torchao's int8-dynamic-activation / intx-weight config, which lowers to XNNPACK.
    `int4_qparams` ("hqq_scale_only" or "affine") is how 8da4w picks its group scales."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import IntxChooseQParamsAlgorithm

    if mode == "8da4w":
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                    intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm(int4_qparams))
    else:
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    out_emb = model.get_output_embeddings()

    def is_base(m, fqn):
        if not isinstance(m, nn.Linear) or m is out_emb:
            return False
        return mode != "8da4w" or m.in_features % 32 == 0

    quantize_(model, cfg, filter_fn=is_base)
    return model


def _edge_compile_config():
    from executorch.exir import EdgeCompileConfig

    # the counter noise shifts int32 values right; the op is outside core ATen, its portable kernel exists
    return EdgeCompileConfig(_core_aten_ops_exception_list=[torch.ops.aten.bitwise_right_shift.Tensor_Scalar,
                                                            torch.ops.aten.bitwise_right_shift.Tensor])


def _int_ops(ep):
    """Map the Python-operator overloads the counter noise traces to (`x >> k`, `x & m`, `x ^ c`)
    onto the bitwise ops that have portable kernels: `aten.__rshift__.Scalar` has none, and
    `__xor__.Scalar` would decompose into an int32 ^ int64-scalar-tensor the edge verifier refuses."""
    aten = torch.ops.aten
    table = {
        aten.__rshift__.Scalar: aten.bitwise_right_shift.Tensor_Scalar,
        aten.__rshift__.Tensor: aten.bitwise_right_shift.Tensor,
        aten.__xor__.Scalar: aten.bitwise_xor.Scalar,
        aten.__and__.Scalar: aten.bitwise_and.Scalar,
        aten.__or__.Scalar: aten.bitwise_or.Scalar,
    }
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    ep.graph_module.recompile()
    return ep


def lower(programs: dict, xnnpack_methods: set[str], constant_methods: dict | None = None):
    """Exported programs -> ExecuTorch program bytes, all methods sharing the mutable buffers;
    `constant_methods` {name: value} become methods that return the value (the program's self-description)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    partitioner = {name: ([XnnpackPartitioner()] if name in xnnpack_methods else []) for name in programs}
    with warnings.catch_warnings():
        # "Mutation on a buffer ... meaningless initial state": InitializedMutableBufferPass below sees to it
        warnings.filterwarnings("ignore", message="Mutation on a buffer")
        edge = to_edge_transform_and_lower(programs, partitioner=partitioner, compile_config=_edge_compile_config(),
                                           constant_methods=constant_methods)
        et = edge.to_executorch(ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass(STATE_PATTERNS)],
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=False,  # with names, read-only methods failed to load or re-initialised state
            run_reinplace_pass=True,  # keeps `_write`'s index_put_ in place: the state is not held twice
        ))
        return et.buffer


def export_program(model: nn.Module, tokenizer, label_ids, *, q: int, batch_size: int, max_length: int,
                   answer_slots: int = 1, loss: str = "class", noise: str = "counter", quantize: str | None = None,
                   out_path: str | os.PathLike, model_name: str, label_words: list[str] | None = None,
                   eval_batch_size: int | None = None, methods: tuple[str, ...] = METHODS, run_defaults: dict | None = None,
                   ranks: int = 1, log=None) -> dict:
    """Export the P-RGE step of an MP-LoRA `model` as `out_path` (.pte) + manifest; returns the manifest.

    The model's LoRA copies are resized to 2q (`set_copies`) and start as the clean B. With
    `quantize`, a deep copy of the model gets a quantised base (the caller's model is untouched).
    `eval_batch_size` (default 2q·b, the rows of a training forward) is the evaluate method's N.
    `methods` picks the methods to export (default: all the device loop needs); "forward_losses"
    adds the plain batched forward over the copies (what benchmarks compare the step against).
    `run_defaults` (seed, steps, lr, eps, ...) is recorded in the manifest: `prge device-train` uses
    them for the options it is not given, so the device run is the one `prge train` would make.
    `ranks` > 1 exports one rank's program of an engine fleet (`prge device-train` under torchrun with
    that many processes): q/ranks queries per rank, the update from all q (`StepProgram.fleet`).
    """
    log = log or (lambda msg: None)
    if noise not in NOISE_MODES:
        raise PrgeError(f"unknown noise mode {noise!r}", f"use one of {', '.join(NOISE_MODES)}")
    if quantize not in QUANTIZE_MODES:
        raise PrgeError(f"unknown quantization {quantize!r}", "use --quantize 8da4w or 8da8w, or leave it out")
    if quantize and (run_defaults or {}).get("eps") is not None:
        check_eps({"quantization": quantize}, run_defaults["eps"])  # the eps a device run would default to
    if loss not in LOSSES:
        raise PrgeError(f"unknown loss {loss!r}", "use --loss class or --loss lm")
    if loss == "class" and label_ids is None:
        raise PrgeError("loss 'class' needs label words", "use --loss lm for completion data")
    if q < 1 or batch_size < 1 or max_length < 2 or answer_slots < 1:
        raise PrgeError(f"bad program shape q={q}, batch_size={batch_size}, max_length={max_length}, answer_slots={answer_slots}",
                        "pass positive --q and --batch-size and --max-length >= 2")
    if not isinstance(ranks, int) or ranks < 1:
        raise PrgeError(f"--ranks must be a whole number >= 1, got {ranks!r}", "pass --ranks 1 for one process")
    if ranks > 1:
        from prge.run.dist import check_split

        check_split(q, ranks)
        if noise != "counter":
            raise PrgeError(f"a program for {ranks} ranks regenerates every rank's noise from the counter generator, "
                            f"not noise {noise!r}", "leave --noise at its default (counter)")
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise PrgeError(f"cannot export a {family!r} model: the exported step is checked against eager training only for "
                        f"the families {', '.join(SUPPORTED_FAMILIES)}", "train it with `prge train` instead, or convert it to one of them")
    layers = lora_layers(model)
    if not layers:
        raise PrgeError("the model has no LoRA layers", "add them with prge.zo.lora.add_lora first")
    w = next(iter(layers.values())).base.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        raise PrgeError(f"the model is {w.dtype} on {w.device}; the exporter traces a float32 CPU model",
                        "load it with dtype float32 on the CPU (use --quantize for a smaller base)")
    out_path = Path(out_path)
    set_copies(model, 2 * (q // ranks))
    table = layer_table(model)
    total = sum(math.prod(x["shape"]) for x in table)
    n_eval = eval_batch_size or 2 * (q // ranks) * batch_size
    with_labels = label_ids is not None
    if with_labels:
        label_ids = torch.as_tensor(label_ids, dtype=torch.long)

    traced = model
    if quantize:
        log(f"quantising the frozen base ({quantize}); train it with eps >= {quantized_min_eps(quantize):g} (activation quantisation noise)")
        traced = _quantize(copy.deepcopy(model), quantize)
    core = StepProgram(traced, label_ids, q, loss, noise, ranks).eval()
    # the rank of the readout_step method's B: the recorded --readout where it is a rank, else the default
    recorded = (run_defaults or {}).get("readout")
    readout_rank = recorded if isinstance(recorded, int) and recorded > 0 else ro.DEFAULT_RANK
    inputs = _example_inputs(q, batch_size, max_length, answer_slots, total, n_eval, loss, noise, with_labels, ranks,
                             len(label_ids) if with_labels else 0, readout_rank)
    if ranks > 1 and "update" not in methods:
        methods = tuple(methods) + ("update",)
    readout = with_labels and loss == "class"  # the label readout's features (`prge.zo.readout`), on the device too
    if readout and "features" not in methods and set(METHODS) <= set(methods):
        methods = tuple(methods) + ("features",)
    if readout and ranks == 1 and "features" in methods and "readout_step" not in methods:  # the C++ runner's readout
        methods = tuple(methods) + ("readout_step",)
    eval_name = "evaluate_class" if with_labels else "evaluate_lm"
    extra = ("forward_losses", "update", "features", "readout_step")
    unknown = set(methods) - set(METHODS) - set(extra)
    if unknown:
        raise PrgeError(f"unknown program methods {sorted(unknown)}", f"choose among {METHODS + extra}")
    if ("features" in methods or "readout_step" in methods) and not readout:
        raise PrgeError("the features and readout_step methods read the label words' logits", "export a classification task with --loss class")
    names = {m: (eval_name if m == "evaluate" else m) for m in methods}
    t0 = time.time()
    programs = {}
    with torch.no_grad():
        for public, impl in names.items():
            core.method = impl
            programs[public] = _int_ops(torch.export.export(core, inputs[public], strict=False))
    log(f"exported {len(programs)} methods in {time.time() - t0:.0f} s; lowering to XNNPACK (about a minute for a tiny model; 15 minutes or more for a 135M-parameter model on 2 cores, most of it ExecuTorch partitioning the graph)")
    # what the program says about itself (formats.CONSTANT_METHODS): its shapes and the identity hash its data must carry
    described = {"model": model_name, "vocab_size": len(tokenizer), "vocab_sha256": vocab_sha256(tokenizer),
                 "pad_id": tokenizer.pad_token_id, "batch_size": batch_size, "max_length": max_length,
                 "answer_slots": answer_slots, "q": q, "loss": loss, "label_ids": label_ids.tolist() if with_labels else None,
                 "layers": table, "eval_batch_size": n_eval, "total": total, "noise": noise,
                 "min_eps": quantized_min_eps(quantize)}
    described["identity_sha256"] = identity_sha256(described)
    t0 = time.time()
    data = lower(programs, {"train_step", "evaluate", "forward_losses", "features"},
                 {method: described[field] for method, field in CONSTANT_METHODS.items()})
    log(f"lowered in {time.time() - t0:.0f} s; program {len(data) / 1e6:.1f} MB")
    io.atomic_write_bytes(out_path, data)

    # the frozen A matrices and the PEFT adapter config, for the device loop's adapter files
    from prge.run import adapters

    with tempfile.TemporaryDirectory() as tmp:
        adapters.save_adapter(model, Path(tmp) / "a", model_name)
        adapter_config = json.loads((Path(tmp) / "a" / adapters.CONFIG_NAME).read_text())
        a_tensors = {k: v for k, v in io.load_tensors(Path(tmp) / "a" / adapters.WEIGHTS_NAME).items() if ".lora_A." in k}
    io.save_tensors(lora_a_path(out_path), a_tensors)

    first = next(iter(layers.values()))
    words = label_words
    if words is None and with_labels:
        words = [tokenizer.decode([i]) for i in label_ids.tolist()]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prge_version": prge.__version__,
        "program": out_path.name,
        "program_bytes": len(data),
        "program_sha256": hashlib.sha256(data).hexdigest(),
        "model": model_name,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or model_name,
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_sha256(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "batch_size": batch_size,
        "max_length": max_length,
        "answer_slots": answer_slots,
        "eval_batch_size": n_eval,
        "q": q,
        "copies": 2 * (q // ranks),
        "ranks": ranks,
        "raw_size": raw_size(q, total, ranks),
        "rank": first.rank,
        "alpha": first.alpha,
        "targets": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "layers": table,
        "total": total,
        "dtype": "float32",
        "noise": noise,
        "reproducible": noise != "engine",
        "loss": loss,
        "label_words": words,
        "label_ids": label_ids.tolist() if with_labels else None,
        "quantization": quantize,
        "int4_qparams": INT4_QPARAMS if quantize == "8da4w" else None,
        "min_eps": described["min_eps"],
        "methods": {public: (FLEET_SIGNATURES.get(impl) if ranks > 1 else None) or METHOD_SIGNATURES[impl]
                    for public, impl in names.items()},
        "adapter_config": adapter_config,
        "lora_a_file": lora_a_path(out_path).name,
        "run_defaults": dict(run_defaults or {}),
        "identity_sha256": described["identity_sha256"],
        "constant_methods": sorted(CONSTANT_METHODS),
    }
    if "features" in names:  # what the device's label readout needs to write its PEFT adapter and logits
        manifest["readout"] = {"head": adapters.head_name(model), "hidden_size": int(model.get_output_embeddings().weight.shape[1]),
                               "softcap": getattr(model.config, "final_logit_softcapping", None)}
        if "readout_step" in names:  # the shapes of the readout_step method (the C++ runner's readout)
            manifest["readout"].update(rank=readout_rank, batch=ro.BATCH, eval_every=ro.EVAL_EVERY)
    assert {k: manifest[k] for k in IDENTITY} == {k: described[k] for k in IDENTITY}, "the program's identity drifted from its manifest"
    if noise == "engine":
        manifest["warning"] = ("noise 'engine' draws z with the runtime's unseeded randn: runs are NOT reproducible, "
                               "cannot be resumed exactly, and do not match eager training")
    manifest = seal(manifest)
    io.atomic_write_json(manifest_path(out_path), manifest)
    return manifest


# ------------------------------------------------------------------------------------------------
# pre-tokenised data for the device loop
