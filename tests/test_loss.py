"""The losses of method.md section 5 against values computed by hand from the formulas."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipgs.config import LossConfig
from clipgs.train.loss import (ClipGSLoss, capped_log_scale, contrastive, contrastive_shared_text,
                               view_weights)


def nll(logits: torch.Tensor, target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits.tolist()))).item()


def contra_by_hand(a, b, s):
    """1/(2N) sum_i [Contra(a_i, B) + Contra(b_i, A)] per row: a list of per-row values."""
    n = len(a)
    return [0.5 * (nll(s * a[i] @ b.T, i) + nll(s * b[i] @ a.T, i)) for i in range(n)]


def test_contrastive_matches_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = torch.tensor(2.0)
    # row 0: logits a0.B = 2*[1, 0]; b0.A = 2*[1, 0.6]
    row0 = 0.5 * (-(2 - math.log(math.exp(2) + 1)) - (2 - math.log(math.exp(2) + math.exp(1.2))))
    # row 1: a1.B = 2*[0.6, 0.8]; b1.A = 2*[0, 0.8]
    row1 = 0.5 * (-(1.6 - math.log(math.exp(1.2) + math.exp(1.6)))
                  - (1.6 - math.log(1 + math.exp(1.6))))
    assert contrastive(a, b, s).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    w = torch.tensor([0.25, 1.5])
    assert contrastive(a, b, s, w).item() == pytest.approx((0.25 * row0 + 1.5 * row1) / 2,
                                                           rel=1e-6)


def test_shared_text_matches_hand_computation_with_a_repeated_caption():
    """text_positives=same_text: 3D->text as before (the repeated caption's columns both
    count); text->3D once per distinct caption, -mean log p over the objects sharing it."""
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    t0, t1 = [1.0, 0.0], [0.6, 0.8]
    b = torch.tensor([t0, t0, t1])
    s = torch.tensor(3.0)
    loss_a = sum(nll(s * a[i] @ b.T, i) for i in range(3)) / 3
    caption0 = (nll(s * b[0] @ a.T, 0) + nll(s * b[0] @ a.T, 1)) / 2  # objects 0 and 1
    caption1 = nll(s * b[2] @ a.T, 2)
    expected = 0.5 * (loss_a + (caption0 + caption1) / 2)
    assert contrastive_shared_text(a, b, s).item() == pytest.approx(expected, rel=1e-6)
    # the paper's per-object rows differ here: caption 0 is a row twice, each time with the
    # other object that shares it as a negative
    assert contrastive(a, b, s).item() != pytest.approx(expected, rel=1e-3)
    out = ClipGSLoss(LossConfig(text_positives="same_text"))(a * 2, b, b[:, None], s)
    assert out["loss_text"].item() == pytest.approx(expected, rel=1e-6)


def test_shared_text_equals_the_paper_loss_when_captions_are_unique():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(16, 8), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(16, 8), dim=-1)
    s = torch.tensor(7.0)
    shared, plain = contrastive_shared_text(a, b, s), contrastive(a, b, s)
    assert shared.item() == pytest.approx(plain.item(), rel=1e-6)
    g1, = torch.autograd.grad(shared, a)
    g2, = torch.autograd.grad(plain, a)
    torch.testing.assert_close(g1, g2)


def _views(cosines):
    """Unit image embeddings whose cosine with t = e0 are the given values."""
    t = torch.tensor([1.0, 0.0])
    img = torch.tensor([[c, math.sqrt(max(0.0, 1 - c * c))] for c in cosines])
    return img[None], t[None]


def test_vote_weights_softmax_and_linear():
    img, t = _views([1.0, 0.0, -0.5])
    w = view_weights(img, t, LossConfig(image_views="vote", vote_temperature=0.5))
    e = [math.exp(2.0), 1.0, math.exp(-1.0)]
    assert w[0].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-5)
    img, t = _views([0.5, 0.25, -0.3])
    w = view_weights(img, t, LossConfig(image_views="vote", vote_weighting="linear"))
    assert w[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0], rel=1e-5)
    img, t = _views([-0.2, -0.9])  # no view agrees with the text: uniform, not NaN
    w = view_weights(img, t, LossConfig(image_views="vote", vote_weighting="linear"))
    assert w[0].tolist() == pytest.approx([0.5, 0.5])


def test_mean_and_random_view_weights():
    img = F.normalize(torch.randn(6, 4, 8), dim=-1)
    t = F.normalize(torch.randn(6, 8), dim=-1)
    assert torch.allclose(view_weights(img, t, LossConfig(image_views="mean")),
                          torch.full((6, 4), 0.25))
    w = view_weights(img, t, LossConfig(image_views="random"))
    assert torch.equal(w.sum(1), torch.ones(6)) and set(w.unique().tolist()) == {0.0, 1.0}


def test_voting_loss_matches_hand_computation():
    """L = L_text + sum_k w_i^k [Contra(g_i, I^k) + Contra(I_i^k, G)] / 2N, w = softmax(S/T)."""
    g = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    img = F.normalize(torch.tensor([[[1.0, 0.1], [0.3, 1.0]], [[0.2, 1.0], [1.0, 1.0]]]), dim=-1)
    s, temp = 3.0, 0.1
    cfg = LossConfig(image_views="vote", vote_temperature=temp)
    out = ClipGSLoss(cfg)(g * 7.0, t, img, torch.tensor(s))  # g is normalised inside
    text = sum(contra_by_hand(g, t, s)) / 2
    image = 0.0
    for i in range(2):
        cos = [float(img[i, k] @ t[i]) for k in range(2)]
        w = [math.exp(c / temp) / sum(math.exp(c2 / temp) for c2 in cos) for c in cos]
        for k in range(2):
            image += w[k] * contra_by_hand(g, img[:, k], s)[i] / 2
    assert out["loss_text"].item() == pytest.approx(text, rel=1e-5)
    assert out["loss_image"].item() == pytest.approx(image, rel=1e-5)
    assert out["loss"].item() == pytest.approx(text + image, rel=1e-5)


def test_logit_scale_cap_never_freezes_the_scale():
    """Above the cap the value is the cap, and the scale comes back down when the loss wants
    a smaller one; a plain clamp in the forward pass left it stuck there for good."""
    cap = math.log(20)
    for start, target, moves in ((cap - 0.5, 100.0, True), (cap + 0.3, 100.0, False),
                                 (cap + 0.3, 5.0, True)):
        p = torch.tensor([start], requires_grad=True)
        ((capped_log_scale(p, cap).exp() - target) ** 2).sum().backward()
        assert (p.grad.abs() > 0).item() == moves, (start, target)
    assert capped_log_scale(torch.tensor([cap + 1.0]), cap).item() == pytest.approx(cap)

    def train(forward):  # first the loss wants a large scale, then 5
        p = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
        opt = torch.optim.AdamW([p], lr=0.05, weight_decay=0.0)
        for step in range(400):
            target = 100.0 if step < 200 else 5.0
            opt.zero_grad()
            ((forward(p).exp() - target) ** 2).sum().backward()
            opt.step()
        return forward(p).exp().item()

    assert train(lambda p: p.clamp(max=cap)) == pytest.approx(20.0)  # the defect: stuck
    assert train(lambda p: capped_log_scale(p, cap)) < 10.0


def test_loss_is_low_when_aligned_and_gradients_reach_only_the_3d_side():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(8, 16), dim=-1)
    img = t[:, None].repeat(1, 3, 1)
    aligned = ClipGSLoss(LossConfig())(t * 5, t, img, torch.tensor(50.0))
    assert aligned["loss"] < 0.01
    g = torch.randn(8, 16, requires_grad=True)
    t_req, img_req = t.clone().requires_grad_(), img.clone().requires_grad_()
    out = ClipGSLoss(LossConfig())(g, t_req, img_req, torch.tensor(50.0))
    assert out["loss"] > 0.01
    out["loss"].backward()
    assert g.grad.abs().sum() > 0
    one = ClipGSLoss(LossConfig(image_views="random"))(t, t, img, torch.tensor(50.0))
    assert one["loss_image"].item() == pytest.approx(aligned["loss_image"].item(), abs=1e-4)


def _rank(rank: int, world: int, port: int, g_all, t_all, img_all, queue, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    n = len(g_all) // world
    g = g_all[rank * n:(rank + 1) * n].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:  # no deprecated collective
        warnings.simplefilter("always")
        out = ClipGSLoss(cfg)(g, t_all[rank * n:(rank + 1) * n],
                              img_all[rank * n:(rank + 1) * n], torch.tensor(10.0))
        out["loss"].backward()
    stale = [str(w.message) for w in caught
             if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    # a numpy copy travels by value: a tensor would go as a shared-memory handle that the
    # parent must fetch from this process, which may have exited by then (ECONNRESET)
    # the text->3D half of same_text: 2 x the text loss - the local 3D->text half
    with torch.no_grad():
        unit = F.normalize(g, dim=-1)
        local_a = F.cross_entropy(10.0 * unit @ F.normalize(t_all, dim=-1).T,
                                  torch.arange(n) + rank * n)
        text_to_3d = 2 * out["loss_text"].item() - local_a.item()
    queue.put((rank, out["loss"].item(), g.grad.numpy().copy(), text_to_3d, stale))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("positives", ["index", "same_text"])
def test_gathered_loss_equals_the_global_batch_loss(positives):
    """2 gloo ranks with half the batch each: the negatives are the global batch, and the
    gradient reaches each rank's features through the gather. With same_text, captions repeat
    within and across the ranks (rank 1 holds caption 0 and 1 again, and caption 3 twice)."""
    from tests.conftest import free_port

    torch.manual_seed(0)
    cfg = LossConfig(image_views="mean", text_positives=positives)
    g = torch.randn(8, 16)
    t = F.normalize(torch.randn(8, 16), dim=-1)
    if positives == "same_text":
        t = t[[0, 1, 0, 2, 1, 3, 0, 3]]
    img = F.normalize(torch.randn(8, 2, 16), dim=-1)
    ref_g = g.clone().requires_grad_()
    ref = ClipGSLoss(cfg)(ref_g, t, img, torch.tensor(10.0))
    ref["loss"].backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, g, t, img, queue, cfg))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # the mean of the ranks' losses is the global loss; grads come back summed over ranks
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert results[0][3] == results[1][3] == []  # torch 2.14 deprecates nn.functional's gather
    grad = torch.from_numpy(np.concatenate([results[0][1], results[1][1]]))
    torch.testing.assert_close(grad, 2 * ref_g.grad, atol=1e-5, rtol=1e-4)
    if positives == "same_text":  # every rank reports the whole batch's text->3D half
        a_half = F.cross_entropy(10.0 * F.normalize(g, dim=-1) @ t.T, torch.arange(8))
        whole = 2 * ref["loss_text"].item() - a_half.item()
        assert results[0][2] == pytest.approx(whole, rel=1e-5)
        assert results[1][2] == pytest.approx(whole, rel=1e-5)
