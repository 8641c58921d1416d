"""The zeroth-order arithmetic: noise, the estimator's expectation, and the three ways of running it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prge.zo import estimator as est
from prge.data.batch import Example, collate, encode, label_word_ids
from prge.zo.lora import add_lora, trainable_b, using
from prge.zo.loss import copy_losses
from prge.testing import tiny_model
from prge.zo.step import mezo_step, prge_step


def key(seed, step):
    return torch.tensor([seed, step], dtype=torch.int64)


def test_counter_noise_is_standard_normal_and_deterministic():
    z = est.counter_normal(key(3, 7), 5, (200_000,))
    assert torch.equal(z, est.counter_normal(key(3, 7), 5, (200_000,)))
    # mean and variance within 5 standard errors of N(0, 1)
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / z.numel())
    # tails: P(|z| > 2) = 0.0455
    assert abs((z.abs() > 2).float().mean().item() - 0.0455) < 0.003


@pytest.mark.parametrize("other", [key(3, 8), key(4, 7)])
def test_noise_streams_differ_and_are_uncorrelated(other):
    n = 100_000
    a = est.counter_normal(key(3, 7), 5, (n,))
    for b in (est.counter_normal(other, 5, (n,)), est.counter_normal(key(3, 7), 6, (n,))):
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 5)), min_size=1, max_size=8),
       q=st.integers(1, 4), budget=st.integers(1, 400))
def test_noise_drawn_in_chunks_is_the_full_draw(shapes, q, budget):
    """The exported step draws its noise a few layers at a time (`noise_chunks`); every tensor's noise
    is the same bits as in the one full draw the eager step makes, and the chunks cover every tensor
    once, in order, each within the budget unless one tensor alone exceeds it."""
    full = est.all_noise(key(2, 9), q, shapes)
    chunks = est.noise_chunks(q, shapes, budget)
    assert [j for c in chunks for j in c] == list(range(len(shapes)))
    for c in chunks:
        assert len(c) == 1 or sum(q * math.prod(shapes[j]) for j in c) <= budget
        assert all(torch.equal(full[j], z) for j, z in zip(c, est.all_noise(key(2, 9), q, shapes, tensors=c)))


def test_rebuild_inverts_dual_copies():
    b = torch.randn(6, 3)
    z = torch.randn(4, 6, 3)
    copies = est.perturbed(b, z, 1e-2, "+-")
    b2, z2 = est.rebuild(copies, 1e-2)
    assert torch.allclose(b2, b, atol=1e-7)
    assert torch.allclose(z2, z, atol=1e-4)


def test_prge_estimate_is_unbiased_on_a_quadratic():
    """E[(1/q) Σ g_i z_i] = ∇L. For a quadratic, the central difference is exact: g_i = z_iᵀ∇L, so the
    estimate's covariance is (‖∇‖² I + ∇∇ᵀ)/q and its mean over N steps has per-coordinate standard
    error sqrt((‖∇‖² + ∇_k²)/(qN)); we allow 5 of them."""
    torch.manual_seed(0)
    d, q, n_steps, eps = 8, 4, 4000, 1e-2
    h = torch.randn(d, d, dtype=torch.float64)
    h = h @ h.T / d + torch.eye(d, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)

    def loss(t):  # t: (copies, d)
        return 0.5 * ((t @ h) * t).sum(-1) + t @ c

    grad = h @ theta + c
    total = torch.zeros(d, dtype=torch.float64)
    for step in range(n_steps):
        z = est.query_noise(key(1, step), 0, q, (d,)).double()
        losses = loss(est.perturbed(theta, z, eps, "+-"))
        g = est.projected_grad(losses[:q], losses[q:], eps)
        total += (theta - est.update(theta, z, g, 1.0))  # = (1/q) Σ g_i z_i
    mean = total / n_steps
    se = torch.sqrt((grad.square().sum() + grad.square()) / (q * n_steps))
    assert ((mean - grad).abs() < 5 * se).all(), (mean - grad) / se


def test_copy_k_equals_a_lora_model_holding_b_k():
    model, _ = tiny_model("llama")
    add_lora(model, rank=4, alpha=8)
    bs = trainable_b(model)
    torch.manual_seed(1)
    copies = [torch.randn(3, *b.shape) * 0.1 for b in bs]
    x = torch.randint(0, 100, (2, 9))
    with using(model, copies), torch.no_grad():
        batched = model(x.repeat(3, 1)).logits
    for k in range(3):
        with torch.no_grad():
            for b, c in zip(bs, copies):
                b.copy_(c[k])
            alone = model(x).logits
        assert torch.allclose(batched[2 * k:2 * k + 2], alone, atol=1e-5)


def _setup(arch="llama"):
    model, tok = tiny_model(arch)
    add_lora(model, rank=4, alpha=8)
    words = [" terrible", " great"]
    ids = label_word_ids(tok, words)
    exs = [Example(f"the film was {w} and fun It was", words[i % 2], i % 2) for i, w in enumerate(["good", "bad", "fine", "dull"])]
    batch = collate(encode(exs, tok, 64, ids), tok.pad_token_id)
    label_ids = torch.tensor(ids)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in trainable_b(model):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model, batch, label_ids


@pytest.mark.parametrize("loss_kind", ["lm", "class"])
def test_dual_single_and_mezo_give_the_same_update(loss_kind):
    results = []
    for method in ("dual", "single", "mezo"):
        model, batch, label_ids = _setup()
        params = trainable_b(model)
        start = [p.detach().clone() for p in params]

        def loss_fn(b, c):
            return copy_losses(model, b, c, label_ids, loss_kind)

        kw = dict(seed=11, q=3, eps=1e-2, lr=0.5)
        if method == "mezo":
            r = mezo_step(model, params, loss_fn, batch, 5, **kw)
        else:
            r = prge_step(model, params, loss_fn, batch, 5, mode=method, **kw)
        results.append((r.losses, r.g, [p.detach() - s for p, s in zip(params, start)]))
    (l0, g0, d0) = results[0]
    assert g0.abs().max() > 0  # the step did something
    # Float rounding: fp32 losses of ~1 carry ~1e-7 error, g = ΔL/2ε then ~1e-5 absolute; the
    # updates (lr·g·z) therefore agree to ~1e-4 of their own size, not bit for bit.
    for losses, g, d in results[1:]:
        assert torch.allclose(losses, l0, atol=1e-5)
        assert torch.allclose(g, g0, atol=1e-3)
        for a, b in zip(d, d0):
            assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item())


def test_nan_loss_stops_with_the_step_named():
    from prge.errors import PrgeError

    model, batch, label_ids = _setup()
    before = [p.detach().clone() for p in trainable_b(model)]

    def loss_fn(b, c):
        return torch.full((c,), float("nan"))

    with pytest.raises(PrgeError, match="step 9"):
        prge_step(model, trainable_b(model), loss_fn, batch, 9, seed=0, q=2, eps=1e-2, lr=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_b(model)))  # no update applied
