import io
import json

import numpy as np
import pytest
import torch

from clipgs.config import IngestConfig
from clipgs.data import shards, storage
from clipgs.data.ingest import ingest
from clipgs.data.sources import discover, voxels_to_gaussians
from clipgs.data.views import render, ring_cameras
from clipgs.errors import StorageError


def test_discover_real_data(shared_data):
    assets = {a.key: a for a in discover(str(shared_data), limit=5)}
    boat = assets["splats_boat"]
    assert boat.caption.startswith("a 3D model of a boat") and "ship" in boat.caption
    assert boat.image_urls and boat.image_urls[0].endswith("thumb.png")
    grids = [a for a in assets.values() if a.source.endswith(tuple(f"/{i}" for i in range(5000)))]
    assert {a.split for a in grids} == {"train", "test"} and len(grids) == 10
    assert all(a.caption.startswith("a 3D model of a ") and a.label for a in grids)
    assert "gaussians_donut" in assets


def test_voxels_to_gaussians_surface_only():
    grid = np.zeros((8, 8, 8), int)
    grid[2:6, 2:6, 2:6] = 1
    cloud = voxels_to_gaussians(grid)
    assert len(cloud) == 64 - 8  # a 4^3 cube minus its 2^3 interior


def _frames(cloud):
    """Each gaussian's rotation matrix (columns: its x, y, z axes) and scales."""
    from clipgs.data.views import quaternion_matrix

    rot = quaternion_matrix(torch.from_numpy(cloud.activated()[:, 10:14])).numpy()
    return rot, np.exp(cloud.scale)


def test_voxel_gaussians_take_the_shape_of_the_surface():
    """A plate gets disks in its plane, a rod needles along it, a box wall disks facing out;
    the same neighbourhood always gets the same quaternion, a lone voxel a round gaussian."""
    plate = np.zeros((12, 12, 12), int)
    plate[2:10, 2:10, 5] = 1
    cloud = voxels_to_gaussians(plate)
    rot, scale = _frames(cloud)
    inner = (np.abs(cloud.xyz[:, :2] - 6.0) < 3).all(1)  # away from the plate's rim
    assert np.allclose(np.abs(rot[:, :, 2]), [0, 0, 1], atol=1e-5)  # normal: axis 2
    assert np.allclose(scale[inner], [np.sqrt(6 / 9), np.sqrt(6 / 9), 0.1], atol=1e-5)
    quats = cloud.activated()[inner, 10:14]
    assert np.allclose(quats, quats[0], atol=1e-6) and (quats[:, 0] >= 0).all()

    rod = np.zeros((12, 12, 12), int)
    rod[5, 5, 1:11] = 1
    rot, scale = _frames(voxels_to_gaussians(rod))
    assert np.allclose(np.abs(rot[1:-1, :, 0]), [0, 0, 1], atol=1e-5)  # along the rod
    assert np.allclose(scale[1:-1], [np.sqrt(2 / 3), 0.1, 0.1], atol=1e-5)

    box = np.zeros((12, 12, 12), int)
    box[2:10, 2:10, 2:10] = 1
    cloud = voxels_to_gaussians(box)
    rot, _ = _frames(cloud)
    wall = np.nonzero((cloud.xyz == [2.5, 5.5, 5.5]).all(1))[0][0]  # centre of the -x wall
    assert np.allclose(rot[wall, :, 2], [-1, 0, 0], atol=1e-5)  # facing out

    lone = np.zeros((5, 5, 5), int)
    lone[2, 2, 2] = 1
    cloud = voxels_to_gaussians(lone)
    assert np.allclose(np.exp(cloud.scale), 0.6) and np.allclose(cloud.rotation, [1, 0, 0, 0])


def test_rendered_silhouette_matches_projected_points():
    """A sphere of radius 0.5 made of small gaussians renders as the disk it projects to (plus
    the ~2 px that thousands of overlapping footprints and the 0.3 px^2 low-pass add)."""
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(6000, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True) * 2  # sphere of radius 0.5
    pts = np.zeros((6000, 14), np.float32)
    pts[:, :3], pts[:, 3:6], pts[:, 6], pts[:, 7:10], pts[:, 10] = xyz, 0.0, 0.95, 0.02, 1.0
    size = 64
    for camera in ring_cameras(3):
        drawn = render(pts, camera, size).numpy().mean(axis=2) < 0.5
        v, u = np.mgrid[0:size, 0:size] + 0.5
        disk = (u - size / 2) ** 2 + (v - size / 2) ** 2 <= (0.5 * 0.95 * size / 2 + 2) ** 2
        iou = (drawn & disk).sum() / (drawn | disk).sum()
        assert iou > 0.9, iou
        assert np.allclose([u[drawn].mean(), v[drawn].mean()], size / 2, atol=0.5)


def test_flat_splats_render_flat():
    """One disk-shaped gaussian: round seen face-on, a thin line seen edge-on (the projected
    covariance, not an isotropic blob)."""
    size = 64
    camera = ring_cameras(1, elevation_deg=0, offset_deg=0)[0]  # looks along +y
    splat = np.zeros((1, 14), np.float32)
    splat[0, 3:6], splat[0, 6] = 0.0, 0.99
    splat[0, 7:10] = [0.2, 0.2, 0.001]  # flat in its own z
    face_on = [np.sqrt(0.5), -np.sqrt(0.5), 0, 0]  # its z turned onto the camera's view axis
    edge_on = [1, 0, 0, 0]  # its z is the image's vertical: seen edge-on
    areas = {}
    for name, q in (("face", face_on), ("edge", edge_on)):
        splat[0, 10:14] = q
        dark = render(splat, camera, size, max_radius=8).numpy().mean(axis=2) < 0.9
        rows, cols = np.nonzero(dark)
        areas[name] = (np.ptp(rows) + 1, np.ptp(cols) + 1)
    assert abs(areas["face"][0] - areas["face"][1]) <= 1  # round
    assert areas["edge"][0] <= 2 and areas["edge"][1] >= 4 * areas["edge"][0]  # a thin line


def test_large_splats_cover_at_clip_resolution():
    """A plane of overlapping splats renders solid at 224 px (CLIP's size): a fixed 4-px
    footprint narrowed every splat to a 2-px sigma there and left the plane speckled."""
    grid = np.stack(np.meshgrid(np.linspace(-0.4, 0.4, 11), np.linspace(-0.4, 0.4, 11)), -1)
    splats = np.zeros((121, 14), np.float32)
    splats[:, 0], splats[:, 2] = grid[..., 0].ravel(), grid[..., 1].ravel()  # the x-z plane
    splats[:, 6], splats[:, 7:10], splats[:, 10] = 0.95, 0.06, 1.0  # ~6 px sigma at 224 px
    camera = ring_cameras(1, elevation_deg=0, offset_deg=0)[0]  # looks along +y, at the plane
    image = render(splats, camera, 224).numpy().mean(axis=2)
    inner = image[70:154, 70:154]  # well inside the plane
    assert inner.max() < 0.2, inner.max()  # solid: no background shows through
    small = render(splats, camera, 64).numpy()  # at 64 px the footprint is as before (4 px)
    np.testing.assert_array_equal(small, render(splats, camera, 64, max_radius=4).numpy())


def composite_reference(pix, alpha, colour, size, background):
    """Front-to-back compositing pixel by pixel, as products in float64: colour = sum_i
    alpha_i c_i prod_{j<i} (1 - alpha_j) + background prod_j (1 - alpha_j)."""
    pix, alpha, colour = pix.numpy(), alpha.double().numpy(), colour.double().numpy()
    start = np.flatnonzero(np.r_[True, pix[1:] != pix[:-1]])
    count = np.diff(np.r_[start, len(pix)])  # fragments of each pixel
    rank = np.arange(len(pix)) - np.repeat(start, count)
    a = np.zeros((len(start), rank.max() + 1))  # one row per pixel, zero-alpha padding
    c = np.zeros(a.shape + (3,))
    row = np.repeat(np.arange(len(start)), count)
    a[row, rank], c[row, rank] = alpha, colour
    before = np.cumprod(np.c_[np.ones(len(a)), 1 - a[:, :-1]], axis=1)
    image = np.full((size * size, 3), background)
    image[pix[start]] = (a[..., None] * before[..., None] * c).sum(1) + \
        background * (before[:, -1] * (1 - a[:, -1]))[:, None]
    return image.reshape(size, size, 3).clip(0, 1)


def test_compositing_stays_exact_over_a_million_fragments():
    """The compositing weights come from one running sum of log(1 - alpha) over every fragment
    of the image. In float32 its rounding grew with the total and put pixels off by up to
    22/255 on the shared donut at 224 px; it must match the product form pixel by pixel."""
    from clipgs.data.views import composite

    g = torch.Generator().manual_seed(0)
    size, n = 224, 1_200_000  # the donut (45k gaussians) gives 4.3M at 224 px
    # sorted by pixel; the last row has no fragments
    pix = torch.randint(0, size * (size - 1), (n,), generator=g).sort().values
    alpha = torch.rand(n, generator=g) * 0.3 + 1 / 255.0  # depth order is the index order
    colour = torch.rand(n, 3, generator=g)
    ours = composite(pix, alpha, colour, size, background=1.0).numpy()
    want = composite_reference(pix, alpha, colour, size, 1.0)
    assert np.abs(ours - want).max() < 1e-5, np.abs(ours - want).max()
    # the same fragments are hard enough to show the float32 sum's error
    f32 = composite(pix, alpha, colour, size, 1.0, accumulate=torch.float32).numpy()
    assert np.abs(f32 - want).max() > 1e-3, np.abs(f32 - want).max()
    assert (ours[-1] == 1.0).all() and ours[:-1].mean() < 0.9  # empty pixels: background


def test_views_ring_the_objects_up_axis():
    """A rod along the object's up axis, red at its top and blue at its bottom, stands upright
    in every view, red above blue, whichever of the six axes is up; a -y-up object (the shared
    .splat files) seen with +z cameras lies on its side instead."""
    from clipgs.data.axes import UP_AXES

    t = np.linspace(-0.45, 0.45, 400)
    for up in UP_AXES:
        axis = np.zeros(3, np.float32)
        axis["xyz".index(up[1])] = 1.0 if up[0] == "+" else -1.0
        rod = np.zeros((len(t), 14), np.float32)
        rod[:, :3] = t[:, None] * axis
        rod[:, 3:6] = np.where(t[:, None] > 0, [0.9, 0.0, 0.0], [0.0, 0.0, 0.9])
        rod[:, 6], rod[:, 7:10], rod[:, 10] = 0.95, 0.01, 1.0
        for camera in ring_cameras(4, up=up):
            image = render(rod, camera, 64).numpy()
            red = (image[..., 0] > 0.6) & (image[..., 2] < 0.4)
            blue = (image[..., 2] > 0.6) & (image[..., 0] < 0.4)
            rows, cols = np.nonzero(red | blue)
            assert np.ptp(rows) > 5 * (np.ptp(cols) + 1), (up, np.ptp(rows), np.ptp(cols))
            assert np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean(), up  # red on top
        if up == "-y":
            rows, cols = np.nonzero(render(rod, ring_cameras(4)[0], 64).numpy().mean(2) < 0.9)
            assert np.ptp(cols) > np.ptp(rows)  # +z cameras: on its side


def test_thumbnails_with_transparency_or_16_bit_grey():
    from PIL import Image

    from clipgs.data.views import load_image

    def png(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    rgb = Image.new("RGB", (8, 8), (0, 0, 0))  # black marked transparent (tRNS): white
    assert load_image(png(rgb, transparency=(0, 0, 0)), 8)[0, 0].tolist() == [255, 255, 255]
    grey = Image.fromarray(np.full((8, 8), 33924, np.uint16))  # 16-bit grey, 132 in 8 bits
    assert load_image(png(grey), 8)[0, 0].tolist() == [132, 132, 132]


def test_ingest_resumes_and_reports_bad_objects(shared_data, tmp_path, teacher):
    src = tmp_path / "src"
    for name in ("cat", "cube", "fish"):
        (src / name).mkdir(parents=True)
        for f in (shared_data / "splats" / name).iterdir():
            (src / name / f.name).write_bytes(f.read_bytes())
    (src / "broken").mkdir()
    (src / "broken" / "broken.splat").write_bytes(b"\0" * 33)
    out = tmp_path / "shards"
    config = IngestConfig(shard_size=2, points=512, views=2)
    first = ingest(str(src), str(out), config, teacher=teacher)
    assert first.manifest["rejected"] == 1 and first.rejects[0]["key"] == "broken"
    assert "not a multiple of 32" in first.rejects[0]["error"]
    report = (out / shards.REJECTS).read_text().splitlines()
    assert json.loads(report[0])["source"].endswith("broken.splat")
    total = sum(first.manifest["splits"][s]["count"] for s in ("train", "test"))
    assert total == 3
    second = ingest(str(src), str(out), config, teacher=teacher)
    assert second.written_shards == 0 and second.skipped_shards == first.written_shards
    samples = list(shards.iterate([str(p) for p in sorted(out.glob("*.tar"))]))
    assert len(samples) == 3
    s = samples[0]
    assert s["gaussians"].shape == (512, 14) and s["img_emb"].shape[0] == 2
    assert s["img_emb"].dtype == np.float16 and s["views"].shape[0] == 2
    # an object fixed in place (same key, new bytes) redoes its shard, and only that one
    cube = next((src / "cube").glob("*.splat")).read_bytes()
    (src / "broken" / "broken.splat").write_bytes(cube)
    fixed = ingest(str(src), str(out), config, teacher=teacher)
    assert fixed.written_shards == 1 and fixed.skipped_shards == first.written_shards - 1
    assert fixed.manifest["rejected"] == 0 and not fixed.rejects
    assert sum(fixed.manifest["splits"][s]["count"] for s in ("train", "test")) == 4
    # a shard whose plan (config) changed is redone
    third = ingest(str(src), str(out), IngestConfig(shard_size=2, points=256, views=2),
                   teacher=teacher)
    assert third.written_shards == first.written_shards


def test_ingest_packs_shards_by_bytes(shared_data, tmp_path, teacher):
    """shard_mb: every shard holds as many objects as fit, the bytes predicted before anything
    is made are the bytes written, and a re-run (with another limit) plans by the same rule."""
    import tarfile

    from clipgs.data.ingest import _meta, plan_shards
    from clipgs.data.sources import discover

    src = tmp_path / "src"
    names = sorted(p.name for p in (shared_data / "splats").iterdir())[:7]
    for name in names:
        (src / name).mkdir(parents=True)
        for f in (shared_data / "splats" / name).iterdir():
            (src / name / f.name).write_bytes(f.read_bytes())
    (src / "broken").mkdir()
    (src / "broken" / "broken.splat").write_bytes(b"\0" * 33)
    dim = teacher.encode_text(["x"]).shape[1]
    sizer = shards.SampleSizer(128, 2, teacher.image_size, dim)
    assets = discover(str(src), mesh_samples=128)
    one = sizer(_meta(assets[0]))
    limit = shards.tar_size(3 * one) + 100  # three objects fit, not four
    config = IngestConfig(points=128, views=2, shard_mb=limit / 1e6, shard_size=1)
    out = tmp_path / "shards"
    result = ingest(str(src), str(out), config, teacher=teacher)
    assert result.manifest["rejected"] == 1
    planned = 0
    for split in ("train", "test"):
        written = result.manifest["splits"][split]["shards"]
        groups = plan_shards([a for a in assets if a.split == split], config, sizer)
        planned += len(groups)
        # shard_size=1 is overridden; the last shard holds the rest
        assert all(len(g) == 3 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 3
        assert len(written) == len(groups)
        for shard, group in zip(written, groups):
            tar = out / shard["name"]
            assert shard["bytes"] == tar.stat().st_size <= limit
            with tarfile.open(tar) as t:  # a valid tar of the planned objects
                assert len(t.getmembers()) == 5 * shard["count"]
            good = [a for a in group if a.key != "broken"]
            assert shard["count"] == len(good)
            # the prediction is exact (a rejected object only makes its shard smaller)
            assert shard["bytes"] == shards.tar_size(sum(sizer(_meta(a)) for a in good))
    assert sum(result.manifest["splits"][s]["count"] for s in ("train", "test")) == len(names)
    assert shards.tar_size(4 * one) > limit  # a fourth object would not have fitted
    again = ingest(str(src), str(out), config, teacher=teacher)
    assert again.written_shards == 0 and again.skipped_shards == planned
    # smaller than one object: each object gets a shard of its own
    single = IngestConfig(points=128, views=2, shard_mb=one / 2e6)
    assert [len(g) for g in plan_shards(assets, single, sizer)] == [1] * len(assets)


def test_local_writes_are_whole_and_readable_by_others(tmp_path):
    """A file appears only complete, with the mode open() would give it (mkstemp's 0600 would
    hide shards from another user of a shared volume), and no temporary file is left."""
    import os

    umask = os.umask(0o027)
    try:
        url = str(tmp_path / "sub" / "a.bin")
        storage.write_bytes(url, b"x" * 10)
        # the umask in force when clipgs was imported (0022 in CI), not mkstemp's owner-only
        assert (os.stat(url).st_mode & 0o777) == 0o666 & ~storage._UMASK
    finally:
        os.umask(umask)
    assert storage.read_bytes(url) == b"x" * 10
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.bin"]


def test_teacher_is_deterministic_and_semantic(teacher):
    from clipgs.models.teacher import Teacher

    import torch

    before = torch.get_num_threads()
    for threads in (1, 2):  # ranks and loader workers run with other thread counts
        torch.set_num_threads(threads)
        try:
            again = Teacher()
        finally:
            torch.set_num_threads(before)
        assert again.identity()["sha256"] == teacher.identity()["sha256"]
    e = teacher.encode_text(["a 3D model of a chair", "a 3D model of a sofa",
                             "a 3D model of a toilet"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
    img = teacher.encode_images(np.zeros((2, teacher.image_size, teacher.image_size, 3), np.uint8))
    assert img.shape == (2, e.shape[1]) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)


def test_ingest_from_and_to_s3(shared_data, s3_server, teacher, monkeypatch):
    for name in ("torus", "ring"):
        for f in (shared_data / "splats" / name).iterdir():
            storage.write_bytes(f"{s3_server}/assets/{name}/{f.name}", f.read_bytes())
    config = IngestConfig(shard_size=4, points=256, views=2)
    result = ingest(f"{s3_server}/assets", f"{s3_server}/shards", config, teacher=teacher)
    manifest = shards.read_manifest(f"{s3_server}/shards")
    assert manifest == result.manifest
    urls = shards.shard_urls(f"{s3_server}/shards", manifest, "train") + shards.shard_urls(
        f"{s3_server}/shards", manifest, "test")
    keys = sorted(s["key"] for s in shards.iterate(urls))
    assert keys == ["ring", "torus"]
    again = ingest(f"{s3_server}/assets", f"{s3_server}/shards", config, teacher=teacher)
    assert again.written_shards == 0

    # a role without s3:ListBucket (the listing is refused; injected, as moto does not enforce
    # policies): each shard is checked with a HEAD of its own, and a bad one is still named
    def denied(url):
        raise StorageError(f"{url}: AccessDenied (ListObjectsV2)")

    monkeypatch.setattr(shards.storage, "list_sizes", denied)
    out = f"{s3_server}/shards"
    split = next(s for s in ("train", "test") if manifest["splits"][s]["count"])
    shards.check_shards(out, manifest, split)
    url = shards.shard_urls(out, manifest, split)[0]
    data = storage.read_bytes(url)
    storage.write_bytes(url, data[:-512])
    with pytest.raises(StorageError, match=f"{len(data) - 512} bytes; the manifest records"):
        shards.check_shards(out, manifest, split)
    storage.remove(url)
    with pytest.raises(StorageError, match="missing; the manifest lists it"):
        shards.check_shards(out, manifest, split)


def test_a_worker_killed_mid_object_rejects_that_object_only(shared_data):
    """The system kills a worker while it reads one object (as the OOM killer would): that
    object is rejected, every other one is made, in order - multiprocessing's Pool would have
    waited for the lost task for ever."""
    import os
    import signal

    from clipgs.data.ingest import triplets
    from clipgs.data.sources import Asset

    parent = os.getpid()
    good = discover(str(shared_data / "splats" / "cube"))[0]

    def killer():
        if os.getpid() != parent:  # only ever in a worker
            os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("not in a worker")

    assets = [Asset(key=f"ok{i}", source=f"ok{i}", caption="", split="train", load=good.load)
              for i in range(6)]
    assets.insert(3, Asset(key="oom", source="huge.ply", caption="", split="train",
                           load=killer))
    out = list(triplets(assets, IngestConfig(points=256, views=1, workers=2), 32))
    assert len(out) == 7
    assert [o[0] is None for o in out] == [False] * 3 + [True] + [False] * 3
    assert out[3][1].startswith("WorkerDied: the process reading it died")
    assert all(o[0].shape == (256, 14) for i, o in enumerate(out) if i != 3)
    alone = list(triplets(assets[:3], IngestConfig(points=256, views=1, workers=0), 32))
    for made, ref in zip(out[:3], alone):  # the same objects as without workers
        np.testing.assert_array_equal(made[0], ref[0])
        np.testing.assert_array_equal(made[1], ref[1])
