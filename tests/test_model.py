import itertools

import numpy as np
import pytest
import torch

from clipgs.config import UNI3D_SIZES, ModelConfig, TrainConfig, load_config
from clipgs.errors import ConfigError
from clipgs.models.encoder import GSEncoder
from clipgs.models.serialization import CODES, ORDERS, serialize
from clipgs.models.tokenizer import fps_numpy, group_numpy, group_torch


def test_cpu_and_torch_grouping_agree():
    rng = np.random.default_rng(0)
    pts = rng.random((2048, 14)).astype(np.float32)
    first = int(fps_numpy(pts[:, :3], 64)[0])
    a, c = group_numpy(pts, 64, 16)
    b, d = group_torch(torch.from_numpy(pts)[None], 64, 16, start=first)
    np.testing.assert_allclose(c, d[0].numpy(), atol=1e-6)
    # the same neighbours (order within a patch may differ on distance ties)
    np.testing.assert_allclose(np.sort(a.reshape(64, -1), 1),
                               np.sort(b[0].numpy().reshape(64, -1), 1), atol=1e-6)
    assert np.abs(a[..., :3]).max() <= np.abs(pts[:, :3]).max()


def test_batched_grouping_matches_per_object_on_real_gaussians(shared_data):
    """Each object of a batch grouped by the torch path equals its own CPU grouping."""
    from clipgs.data.formats import read_gaussians
    from clipgs.data.gaussians import resample

    rng = np.random.default_rng(0)
    files = [shared_data / "splats" / n / f"{n}_10k.splat" for n in ("cat", "teapot")]
    objs = [resample(read_gaussians(f.read_bytes(), str(f)).activated(), 2048, rng)
            for f in files]
    starts = torch.tensor([int(fps_numpy(o[:, :3], 128)[0]) for o in objs])
    tp, tc = group_torch(torch.from_numpy(np.stack(objs)), 128, 32, start=starts)
    for i, o in enumerate(objs):
        patches, centres = group_numpy(o, 128, 32)
        assert patches.shape == (128, 32, 14) and centres.shape == (128, 3)
        np.testing.assert_allclose(centres, tc[i].numpy(), atol=1e-6)
        np.testing.assert_allclose(np.sort(patches.reshape(128, -1), 1),
                                   np.sort(tp[i].numpy().reshape(128, -1), 1), atol=1e-5)


def test_grouping_is_deterministic():
    pts = np.random.default_rng(1).random((1024, 14)).astype(np.float32)
    np.testing.assert_array_equal(group_numpy(pts, 32, 8)[1], group_numpy(pts, 32, 8)[1])


@pytest.mark.parametrize("order", ORDERS)
def test_serialization_codes_are_bijections_and_orders_are_permutations(order):
    grid = torch.tensor(list(itertools.product(range(8), repeat=3)))
    codes = CODES[order](grid, 3)
    assert sorted(codes.tolist()) == list(range(512))  # a bijection of the 8^3 grid
    centres = torch.rand(3, 100, 3) * 2 - 1
    perm = serialize(centres, order)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(100).expand(3, -1))


def test_serialization_preserves_locality():
    grid = torch.tensor(list(itertools.product(range(8), repeat=3)))
    steps = {}
    for order in ORDERS:
        walk = grid[CODES[order](grid, 3).argsort()]
        steps[order] = (walk[1:] - walk[:-1]).abs().sum(-1).float()
    assert steps["hilbert"].max() == 1  # every Hilbert step is to a face neighbour
    assert steps["z"].mean() < 2.0 and steps["xyz"].mean() < 2.0
    # against a random order of the same points: curves keep consecutive tokens close
    torch.manual_seed(0)
    rand = grid[torch.randperm(512)]
    assert (rand[1:] - rand[:-1]).abs().sum(-1).float().mean() > 5.0
    # on random centres, Hilbert neighbours are closer than random neighbours
    c = torch.rand(1, 512, 3) * 2 - 1
    walk = c[0, serialize(c, "hilbert")[0]]
    assert (walk[1:] - walk[:-1]).norm(dim=-1).mean() < 0.3 * (c[0, 1:] - c[0, :-1]).norm(
        dim=-1).mean()


def _encoder(**kw) -> GSEncoder:
    cfg = ModelConfig(groups=8, group_size=8, width=48, depth=2, heads=3, **kw)
    return GSEncoder(cfg, embed_dim=20)


@pytest.mark.parametrize("kw", [dict(patch_dropout=0.5), dict(serialization=()),
                                dict(attribute_branch=False), dict(mlp="swiglu_norm")])
def test_encoder_shapes_and_gradients(kw):
    enc = _encoder(**kw)
    out = enc(torch.randn(4, 8, 8, 14), torch.rand(4, 8, 3) * 2 - 1)
    assert out.shape == (4, 20)
    out.sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
    assert (enc.attributes is None) == (kw.get("attribute_branch") is False)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    from clipgs.models.encoder import drop_path

    torch.manual_seed(0)
    x = torch.randn(4000, 5, 6)
    out = drop_path(x, 0.25, training=True)
    dropped = (out == 0).flatten(1).all(1)
    # each sample is either dropped whole or kept whole, scaled by 1 / (1 - rate)
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.75)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    torch.testing.assert_close(out.mean(0), x.mean(0), atol=0.1, rtol=0)
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x


def test_drop_path_rates_rise_over_depth_and_vanish_in_evaluation():
    torch.manual_seed(0)
    enc = _encoder(drop_path=0.3, serialization=())
    deep = GSEncoder(ModelConfig(groups=8, group_size=8, width=48, depth=4, heads=3,
                                 drop_path=0.3), embed_dim=20)
    assert [b.drop_path for b in enc.blocks] == [0.0, pytest.approx(0.3)]
    assert [round(b.drop_path, 6) for b in deep.blocks] == [0.0, 0.1, 0.2, 0.3]
    plain = _encoder(serialization=())
    plain.load_state_dict(enc.state_dict())  # no weights of its own: checkpoints fit either way
    patches, centres = torch.randn(64, 8, 8, 14), torch.rand(64, 8, 3) * 2 - 1
    enc.eval(), plain.eval()
    torch.testing.assert_close(enc(patches, centres), plain(patches, centres))
    enc.train(), plain.train()
    runs = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs[seed] = enc(patches, centres), plain(patches, centres)
    torch.testing.assert_close(runs[1][1], runs[2][1])  # nothing random without drop path
    # per sample: the same output where both draws kept and dropped the same branches (about
    # a third of the samples at rate 0.3 on two branches), another elsewhere
    same = torch.isclose(runs[1][0], runs[2][0]).all(1)
    assert 5 < same.sum() < 45
    runs[1][0].sum().backward()
    assert enc.blocks[1].mlp.fc1.weight.grad is not None


def test_encoder_embedding_does_not_depend_on_patch_order():
    """At inference the fixed serialization order makes the input order irrelevant."""
    torch.manual_seed(0)
    enc = _encoder().eval()
    patches, centres = torch.randn(2, 8, 8, 14), torch.rand(2, 8, 3) * 2 - 1
    perm = torch.randperm(8)
    torch.testing.assert_close(enc(patches, centres), enc(patches[:, perm], centres[:, perm]))


def test_cpu_attention_is_pytorchs_sdpa_written_out():
    from clipgs.models.encoder import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    expected = torch.autograd.grad(
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("orders", [("hilbert", "z", "xyz"), ()])
def test_patch_dropout_tokenizes_only_the_kept_patches(orders):
    """Dropout is decided before the tokenizer: it sees half the patches, and the embedding is
    what tokenizing every patch and dropping tokens afterwards gives (BatchNorm frozen, so both
    use the same statistics; same random draws)."""
    from clipgs.models.serialization import serialize

    def reference(enc, patches, centres):  # tokenize all, serialize, then drop
        tokens = enc.tokens(patches, centres)
        b, g, w = tokens.shape
        if orders:
            o = enc.order_index()
            perm = serialize(centres, orders[o])
            tokens = tokens.gather(1, perm[..., None].expand(-1, -1, w))
            tokens = tokens + enc.seq_embed + enc.order_embed[o]
        idx = torch.rand(b, g).argsort(dim=1)[:, :g // 2].sort(1).values
        x = torch.cat([(enc.cls_token + enc.cls_pos).expand(b, -1, -1),
                       tokens.gather(1, idx[..., None].expand(-1, -1, w))], dim=1)
        for block in enc.blocks:
            x = block(x)
        return enc.head(enc.norm(x[:, 0]))

    torch.manual_seed(0)
    enc = _encoder(patch_dropout=0.5, serialization=orders).train()
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    torch.nn.init.normal_(enc.attributes.out.weight, std=0.1)  # make branch 2 count too
    patches, centres = torch.randn(3, 8, 8, 14), torch.rand(3, 8, 3) * 2 - 1
    seen = []
    hook = enc.pos_colour.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    torch.manual_seed(1)
    out = enc(patches, centres)
    hook.remove()
    torch.manual_seed(1)
    with torch.no_grad():
        expected = reference(enc, patches, centres)
    torch.testing.assert_close(out, expected)
    assert seen == [3 * 4]  # 4 of 8 patches per object reach the tokenizer
    out.sum().backward()
    assert enc.pos_colour.fc1.weight.grad is not None


def test_serialization_draws_an_order_per_training_batch():
    torch.manual_seed(0)
    enc = _encoder()
    enc.train()
    drawn = {enc.order_index() for _ in range(50)}
    assert drawn == {0, 1, 2}
    enc.eval()
    assert {enc.order_index() for _ in range(10)} == {0}
    with pytest.raises(ValueError, match="model.groups=8"):
        enc(torch.randn(1, 6, 8, 14), torch.rand(1, 6, 3))


def test_attribute_branch_starts_as_a_no_op_and_learns_the_other_attributes():
    """Branch 2 carries the non-geometric attributes. Its output layer starts at zero (a loaded
    point-cloud model's tokens are unchanged at init); one optimiser step makes opacity matter.
    Without the branch, opacity never matters."""
    torch.manual_seed(0)
    patches, centres = torch.randn(2, 8, 8, 14), torch.rand(2, 8, 3) * 2 - 1
    changed = patches.clone()
    changed[..., 6] += 1.0  # opacity
    for branch in (True, False):
        enc = _encoder(attribute_branch=branch)
        with torch.no_grad():
            enc.eval()
            torch.testing.assert_close(enc(patches, centres), enc(changed, centres))
        enc.train()
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        enc(patches, centres).square().sum().backward()
        opt.step()
        with torch.no_grad():
            enc.eval()
            assert (not torch.allclose(enc(patches, centres), enc(changed, centres))) == branch


def test_named_sizes_follow_uni3d():
    expected = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
                "large": (1024, 24, 16), "giant": (1408, 40, 16)}
    assert set(UNI3D_SIZES) == set(expected)
    for size, (w, d, h) in expected.items():
        cfg = load_config(TrainConfig, None, [f"model.size={size}"]).model
        assert (cfg.width, cfg.depth, cfg.heads, cfg.pointnet_out) == (w, d, h, 512)
        assert ModelConfig(**cfg.model_dump()) == cfg  # a saved package's config reloads
    with torch.device("meta"):  # parameter counts without allocating: base ~88M, giant ~1B
        base = sum(p.numel() for p in GSEncoder(ModelConfig(size="base"), 1024).parameters())
        giant = sum(p.numel() for p in GSEncoder(ModelConfig(size="giant"), 1024).parameters())
    assert 80e6 < base < 95e6 and 0.95e9 < giant < 1.1e9
    with pytest.raises(ConfigError, match="conflicts with model.size=base"):
        load_config(TrainConfig, None, ["model.size=base", "model.width=100"])
    with pytest.raises(ConfigError, match="model.size"):
        load_config(TrainConfig, None, ["model.size=huge"])


def test_tiny_size_forward_and_default_is_small():
    assert sum(p.numel() for p in GSEncoder(ModelConfig(), 384).parameters()) < 3e6
    cfg = ModelConfig(size="tiny", groups=16, group_size=16)
    enc = GSEncoder(cfg, 64)
    out = enc(torch.randn(2, 16, 16, 14), torch.rand(2, 16, 3) * 2 - 1)
    out.sum().backward()
    assert out.shape == (2, 64) and enc.blocks[0].mlp.fc1_g.weight.grad is not None
