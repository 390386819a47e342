"""Meshes and point clouds as sources: surface splats on the surface, oriented to it, coloured
from vertex colours, face colours, textures or materials; files a mesh names fetched beside it."""

import io
import json

import numpy as np
import pytest
import trimesh
from PIL import Image
from plyfile import PlyData, PlyElement

from clipgs.config import IngestConfig
from clipgs.data import shards
from clipgs.data.formats import load_gaussians, read_gaussians
from clipgs.data.gaussians import SLICES
from clipgs.data.ingest import ingest
from clipgs.data.sources import discover
from clipgs.errors import GaussianFormatError


def _rgb(cloud):
    return cloud.activated()[:, SLICES["rgb"]]


def _box(colour=None):
    mesh = trimesh.creation.box(extents=(1, 1, 1))
    if colour is not None:
        mesh.visual.vertex_colors = np.tile([*colour, 255], (len(mesh.vertices), 1))
    return mesh


def _textured_sphere(colour):
    mesh = trimesh.creation.uv_sphere(radius=0.5)
    image = Image.new("RGB", (16, 16), colour)
    uv = np.random.default_rng(0).random((len(mesh.vertices), 2))
    # white base colour: glTF multiplies the texture by it (trimesh's default is grey)
    material = trimesh.visual.material.SimpleMaterial(image=image, diffuse=[255, 255, 255, 255])
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return mesh


def test_splats_lie_on_the_surface_oriented_to_it():
    data = _box((200, 30, 30)).export(file_type="obj")
    cloud = read_gaussians(data.encode(), "box.obj", mesh_samples=3000, seed=1)
    assert len(cloud) == 3000
    assert np.allclose(np.abs(cloud.xyz).max(axis=1), 0.5, atol=1e-5)  # on a face of the box
    q = cloud.activated()[:, SLICES["rotation"]]
    w, x, y, z = q.T  # the rotated +z axis must be the face normal (the dominant coordinate)
    axis = np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], axis=1)
    face = np.argmax(np.abs(cloud.xyz), axis=1)
    assert np.allclose(np.abs(axis[np.arange(3000), face]), 1, atol=1e-4)
    scale = np.exp(cloud.scale)
    assert (scale[:, 2] < scale[:, 0]).all()  # flat disks
    np.testing.assert_allclose(_rgb(cloud).mean(0), np.array([200, 30, 30]) / 255, atol=0.01)


def test_colour_from_texture_material_and_faces(tmp_path):
    glb = _textured_sphere((20, 200, 40)).export(file_type="glb")
    np.testing.assert_allclose(_rgb(read_gaussians(glb, "s.glb", 2000)).mean(0),
                               np.array([20, 200, 40]) / 255, atol=0.02)
    plain = trimesh.creation.box()
    plain.visual = trimesh.visual.TextureVisuals(
        material=trimesh.visual.material.PBRMaterial(baseColorFactor=[0, 0, 255, 255]))
    np.testing.assert_allclose(
        _rgb(read_gaussians(plain.export(file_type="glb"), "m.glb", 500)).mean(0), [0, 0, 1],
        atol=0.01)
    faces = _box()
    faces.visual.face_colors = np.tile([250, 250, 0, 255], (len(faces.faces), 1))
    ply = faces.export(file_type="ply")  # a .ply with faces is a mesh, not gaussians
    np.testing.assert_allclose(_rgb(read_gaussians(ply, "f.ply", 500)).mean(0),
                               np.array([250, 250, 0]) / 255, atol=0.01)
    grey = read_gaussians(_box().export(file_type="stl"), "b.stl", 500)
    assert len(grey) == 500


def test_obj_with_mtl_and_texture_beside_it(tmp_path):
    obj, files = trimesh.exchange.obj.export_obj(_textured_sphere((250, 120, 0)),
                                                 include_texture=True, return_texture=True)
    (tmp_path / "ball.obj").write_text(obj)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cloud = load_gaussians(tmp_path / "ball.obj", mesh_samples=1000)
    np.testing.assert_allclose(_rgb(cloud).mean(0), np.array([250, 120, 0]) / 255, atol=0.02)


def test_obj_with_uvs_and_a_plain_material_colour(tmp_path):
    """Texture coordinates but no texture map: the material's Kd, not white."""
    (tmp_path / "m.mtl").write_text("newmtl red\nKd 0.9 0.1 0.1\n")
    (tmp_path / "tri.obj").write_text(
        "mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nusemtl red\n"
        "f 1/1 2/2 3/3\n")
    cloud = load_gaussians(tmp_path / "tri.obj", mesh_samples=200)
    np.testing.assert_allclose(_rgb(cloud).mean(0), [0.9, 0.1, 0.1], atol=0.02)


def _point_cloud_ply(n=400, text=False) -> bytes:
    rng = np.random.default_rng(0)
    v = np.empty(n, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"),
                           ("green", "u1"), ("blue", "u1")])
    xyz = rng.normal(size=(n, 3))
    v["x"], v["y"], v["z"] = xyz.T
    v["red"], v["green"], v["blue"] = 10, 100, 250
    buf = io.BytesIO()
    PlyData([PlyElement.describe(v, "vertex")], text=text).write(buf)
    return buf.getvalue()


def test_point_clouds_become_gaussians():
    for text in (False, True):
        cloud = read_gaussians(_point_cloud_ply(text=text), "p.ply")
        assert len(cloud) == 400 and cloud.sh_degree == 0
        np.testing.assert_allclose(_rgb(cloud).mean(0), np.array([10, 100, 250]) / 255, atol=1e-3)
        assert (np.exp(cloud.scale) > 0).all()
    xyz = read_gaussians(b"# x y z r g b\n0 0 0 255 0 0\n1 0 0 255 0 0\n0 1 0 255 0 0\n",
                         "p.xyz")
    assert len(xyz) == 3 and np.allclose(_rgb(xyz)[:, 0], 1)


@pytest.mark.parametrize("name, data, words", [
    ("bad.obj", b"v 0 0 0\nv 1 0 0\n", "no triangles"),
    ("bad.glb", b"glTF\x02\x00\x00\x00garbage", "not a readable .glb"),
    ("bad.stl", b"\x00" * 10, "no triangles"),
    ("bad.xyz", b"1 2\n3 4\n", "expected 3"),
    ("nan.xyz", b"1 2 nan\n3 4 5\n", "non-finite"),
    ("empty.ply", b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
                  b"property float z\nend_header\n", "zero points"),
])
def test_bad_meshes_and_points_get_one_clear_error(name, data, words):
    with pytest.raises(GaussianFormatError) as err:
        read_gaussians(data, name)
    assert str(err.value).startswith(name) and words in str(err.value)


def test_ingest_a_folder_of_meshes_and_points(tmp_path, teacher):
    src = tmp_path / "assets"
    for name, mesh, colour in (("red_box", _box((220, 20, 20)), "red"),
                               ("green_ball", _textured_sphere((20, 200, 40)), "green")):
        (src / name).mkdir(parents=True)
        (src / name / f"{name}.glb").write_bytes(mesh.export(file_type="glb"))
        (src / name / "meta.json").write_text(json.dumps({"title": f"a {colour} thing",
                                                          "label": colour, "split": "train"}))
    (src / "cloud.ply").write_bytes(_point_cloud_ply())
    (src / "cloud.txt").write_text("a blue point cloud")
    (src / "broken.obj").write_text("v 0 0 0\n")
    assets = {a.key: a for a in discover(str(src))}
    assert set(assets) == {"red_box", "green_ball", "cloud", "broken"}
    assert assets["cloud"].caption == "a blue point cloud"
    config = IngestConfig(shard_size=8, points=512, views=2)
    result = ingest(str(src), str(tmp_path / "shards"), config, teacher=teacher)
    assert [r["key"] for r in result.rejects] == ["broken"]
    assert "no triangles" in result.rejects[0]["error"]
    m = result.manifest
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 3
    urls = [u for s in ("train", "test") for u in shards.shard_urls(str(tmp_path / "shards"), m, s)]
    samples = {s["key"]: s for s in shards.iterate(urls)}
    red = samples["red_box"]
    assert red["gaussians"].shape == (512, 14) and red["views"].shape[0] == 2
    assert red["gaussians"][:, SLICES["rgb"]].mean(0)[0] > 0.8


def test_bad_sidecars_and_oversized_files_reject_only_their_object(tmp_path, monkeypatch):
    from clipgs.data import sources

    src = tmp_path / "assets"
    for name in ("good", "listmeta", "badjson", "huge", "badtags", "nulltags", "badup"):
        (src / name).mkdir(parents=True)
        (src / name / f"{name}.obj").write_text(_box((9, 9, 9)).export(file_type="obj"))
    (src / "good" / "thumb.png").write_bytes(b"not a png")  # a broken view: rendered instead
    (src / "listmeta" / "meta.json").write_text("[1, 2]")
    (src / "badjson" / "meta.json").write_text("{title:")
    (src / "badtags" / "meta.json").write_text('{"title": "a box", "tags": 5}')
    (src / "nulltags" / "meta.json").write_text('{"title": "a box", "tags": null}')
    (src / "badup" / "meta.json").write_text('{"title": "a box", "up": "sideways"}')
    (src / "huge" / "huge.obj").write_text("v 0 0 0\n" * 5000)
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 20_000)
    assets = {a.key: a for a in discover(str(src), mesh_samples=200)}
    errors = {}
    for key, asset in assets.items():
        try:
            asset.load()
        except GaussianFormatError as err:
            errors[key] = str(err)
    assert set(errors) == {"listmeta", "badjson", "huge", "badtags", "badup"}
    assert "field 'tags' is 5; expected a list of strings" in errors["badtags"]
    assert 'field \'up\' is "sideways"; expected one of +x, -x' in errors["badup"]
    assert assets["nulltags"].caption == "a box"
    assert "a JSON list; expected an object" in errors["listmeta"]
    assert "not valid JSON" in errors["badjson"] and "over the limit" in errors["huge"]
    from clipgs.data.ingest import make_triplet

    points, views = make_triplet(assets["good"], IngestConfig(points=128, views=2), 32)
    assert views.shape == (2, 32, 32, 3)


def _mixed_source(root, shared_data):
    """Everything in ../shared/data (ModelNet10 limited by the config) plus a folder of meshes
    in every mesh format and a point cloud."""
    import shutil

    shutil.copytree(shared_data, root, dirs_exist_ok=True)
    meshes = root / "meshes"
    meshes.mkdir()
    (meshes / "box.obj").write_text(_box((200, 30, 30)).export(file_type="obj"))
    (meshes / "ball.glb").write_bytes(_textured_sphere((20, 200, 40)).export(file_type="glb"))
    (meshes / "plate.stl").write_bytes(_box().export(file_type="stl"))
    (meshes / "tower.off").write_text(_box().export(file_type="off"))
    (meshes / "cloud.ply").write_bytes(_point_cloud_ply())
    (meshes / "dots.xyz").write_text("0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    return root


@pytest.mark.slow
def test_cli_ingests_everything_locally_and_from_s3_without_redoing_work(
        shared_data, tmp_path, s3_server, capsys):
    from clipgs.cli import main
    from clipgs.data import storage

    src = _mixed_source(tmp_path / "assets", shared_data)
    args = ["limit=3", "points=256", "views=2", "shard_size=16"]
    expected = 16 + 6 + 2 * 3  # real 3DGS files + meshes and points + ModelNet10 grids
    runs = {}
    for where, source, out in (
            ("local", str(src), str(tmp_path / "shards")),
            ("s3", f"{s3_server}/assets", f"{s3_server}/shards")):
        if where == "s3":
            for f in src.rglob("*"):
                if f.is_file():
                    storage.write_bytes(f"{s3_server}/assets/{f.relative_to(src)}", f.read_bytes())
        for attempt in range(2):
            assert main(["ingest", source, out, *args]) == 0
            runs[where, attempt] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for where in ("local", "s3"):
        first, again = runs[where, 0], runs[where, 1]
        assert first["rejected"] == 0, first
        assert first["train"] + first["test"] == expected
        assert first["shards_written"] > 0 and again["shards_written"] == 0
        assert again["shards_skipped"] == first["shards_written"]
        assert {k: again[k] for k in ("train", "test")} == {k: first[k] for k in ("train", "test")}
    assert runs["local", 0]["train"] == runs["s3", 0]["train"]


def test_keys_are_never_empty_and_bad_grid_files_reject_only_themselves(tmp_path):
    """Names beyond ASCII keep distinct, non-empty keys; a single file given as the source is
    keyed by its name; a grid file that is not an .npz, or one grid's label outside the
    classes, is a rejected asset, not a crash that loses the rest."""
    import io

    src = tmp_path / "assets"
    src.mkdir()
    box = _box((9, 9, 9)).export(file_type="obj")
    for name in ("猫.obj", "犬.obj", "chair猫.obj", "plain.obj"):
        (src / name).write_text(box)
    (src / "broken.npz").write_bytes(b"PK\x03\x04garbage")
    grids = np.zeros((3, 8, 8, 8), np.int32)
    grids[:, 2:6, 2:6, 2:6] = 1
    buf = io.BytesIO()
    np.savez(buf, X_train=grids, y_train=np.array([0, 7, 1]), X_test=grids[:1],
             y_test=np.array([1]), classes=np.array(["box", "cube"]))
    (src / "grids.npz").write_bytes(buf.getvalue())
    assets = {a.key: a for a in discover(str(src))}
    assert "" not in assets and "plain" in assets
    hashed = [k for k in assets if k not in ("plain", "broken") and not k.startswith("grids")]
    assert len(hashed) == 3 and any(k.startswith("chair_") for k in hashed)
    errors = {}
    for key, asset in assets.items():
        if key.startswith(("grids", "broken")):
            try:
                asset.load()
            except GaussianFormatError as err:
                errors[key] = err
    assert set(errors) == {"broken", "grids_train_00001"}
    assert "not a readable .npz" in str(errors["broken"])
    assert errors["grids_train_00001"].field == "y_train[1]"
    assert "label 7; expected 0..1" in str(errors["grids_train_00001"])
    assert assets["grids_train_00002"].label == "cube"
    from clipgs.data import sources

    with pytest.MonkeyPatch.context() as mp:  # the memory guard covers grid files too
        mp.setattr(sources, "MAX_FILE_BYTES", 100)
        (big,) = [a for a in discover(str(src)) if a.key == "grids"]
        with pytest.raises(GaussianFormatError, match="over the limit"):
            big.load()
    (single,) = discover(str(src / "plain.obj"))
    assert single.key == "plain_obj"
    (again,) = discover(f"{src}//plain.obj")
    assert again.key == "plain_obj"


def test_one_file_as_the_source_keeps_its_sidecars(shared_data):
    """One file given as the source is the same object as in its folder - title, tags,
    thumbnail as a view - keyed by its file name; its folder's other files are not objects."""
    folder = shared_data / "splats/cat"
    (alone,) = discover(str(folder / "cat_10k.splat"))
    (inside,) = [a for a in discover(str(folder.parent)) if a.key == "cat"]
    assert alone.key == "cat_10k_splat"
    assert alone.caption == inside.caption and "tagged animal" in alone.caption
    assert alone.image_urls == inside.image_urls == [str(folder / "thumb.png")]
    (donut,) = discover(str(shared_data / "gaussians/donut.ply"))  # three other .ply beside it
    assert donut.key == "donut_ply" and donut.image_urls == []


def test_mesh_resources_stay_beside_the_mesh(tmp_path):
    """A .gltf from an untrusted source cannot make ingestion read files elsewhere (data: URIs
    are decoded by trimesh itself and never reach the resolver)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(36, np.float32).tobytes())
    for uri in (str(secret), "../secret.bin", "file:///etc/hostname"):
        gltf = {"asset": {"version": "2.0"}, "buffers": [{"uri": uri, "byteLength": 36}],
                "bufferViews": [{"buffer": 0, "byteLength": 36}],
                "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3,
                               "type": "VEC3", "min": [0, 0, 0], "max": [1, 1, 1]}],
                "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
                "nodes": [{"mesh": 0}], "scenes": [{"nodes": [0]}], "scene": 0}
        folder = tmp_path / "mesh"
        folder.mkdir(exist_ok=True)
        with pytest.raises(GaussianFormatError, match="expected a relative path inside"):
            read_gaussians(json.dumps(gltf).encode(), str(folder / "m.gltf"))


def test_empty_occupancy_grid_names_its_array():
    from clipgs.data.sources import voxels_to_gaussians

    with pytest.raises(GaussianFormatError) as err:
        voxels_to_gaussians(np.zeros((4, 4, 4), int), "m.npz#train/7", "X_train[7]")
    assert str(err.value).startswith("m.npz#train/7: field 'X_train[7]': empty occupancy grid")


def test_up_axis_from_sidecar_config_or_format(shared_data, tmp_path, teacher):
    """Views ring the object's up axis: a sidecar's "up" first, then the ingest's ``up``, and
    with ``auto`` the format's convention (glTF and OBJ +y, .splat -y, the rest +z). A re-run with
    another axis redoes the shards whose objects it turns and only those; a shard of +z objects
    keeps the plan hash it had before the axis existed, so old datasets are not redone."""
    from clipgs.data.ingest import _plan_hash, object_up
    from clipgs.data.sources import Asset

    src = tmp_path / "assets"
    (src / "spot").mkdir(parents=True)
    (src / "spot" / "spot_10k.splat").write_bytes(
        (shared_data / "splats" / "spot" / "spot_10k.splat").read_bytes())
    (src / "tile").mkdir()
    (src / "tile" / "tile.ply").write_bytes(
        (shared_data / "gaussians" / "gs3d_lod5_tile.ply").read_bytes())
    (src / "ball.glb").write_bytes(_textured_sphere((20, 200, 40)).export(file_type="glb"))
    (src / "box.obj").write_text(_box((9, 9, 9)).export(file_type="obj"))
    (src / "box.json").write_text(json.dumps({"title": "a box", "up": "Z"}))
    (src / "plate.stl").write_bytes(_box().export(file_type="stl"))
    (src / "rod.obj").write_text(_box().export(file_type="obj"))
    assets = {a.key: a for a in discover(str(src), mesh_samples=256)}
    auto, flat = IngestConfig(), IngestConfig(up="x")
    from clipgs.data.axes import format_up

    assert [format_up(p) for p in ("s3://b/scan.spz", "b.GLB", "c/d.splat", "e.ply",
                                   "f/modelnet10.npz#train/5")] == ["+y", "+y", "-y", "+z", "+z"]
    assert flat.up == "+x" and assets["box"].up == "+z"
    assert {k: object_up(a, auto) for k, a in assets.items()} == {
        "spot": "-y", "tile": "+z", "ball": "+y", "box": "+z", "plate": "+z", "rod": "+y"}
    assert {k: object_up(a, flat) for k, a in assets.items()} == {
        "spot": "+x", "tile": "+x", "ball": "+x", "box": "+z", "plate": "+x", "rod": "+x"}
    # recorded by the code before the up axis: a +z object's shard is not redone
    old = Asset(key="gaussians_donut", source="x/donut.ply", caption="", split="train",
                load=lambda: None)
    assert _plan_hash(IngestConfig(points=256, views=2, shard_size=1), "0" * 64, [old]) == (
        "269871e40f7631ebcc95781d34c91f00957b928172037f5894adacd80e19e53c")

    for name in ("ball.glb", "box.obj", "box.json", "plate.stl", "rod.obj"):
        (src / name).unlink()
    out = str(tmp_path / "shards")
    runs = {}
    for up in ("auto", "-y", "auto"):  # spot is -y all along; the tile turns and turns back
        result = ingest(str(src), out, IngestConfig(points=128, views=2, shard_size=1, up=up),
                        teacher=teacher)
        runs.setdefault(up, []).append((result.written_shards, result.skipped_shards))
        assert result.manifest["rejected"] == 0
    assert runs == {"auto": [(2, 0), (1, 1)], "-y": [(1, 1)]}
    samples = {s["key"]: s for s in shards.iterate(
        sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")))}
    # both views of each (no thumbnails here) are rendered around the object's axis
    from clipgs.data.views import render_views

    for key, up in (("spot", "-y"), ("tile", "+z")):
        s = samples[key]
        k, size = s["views"].shape[:2]
        right, wrong = (np.abs(s["views"].astype(float) - np.stack(
            render_views(s["gaussians"], k, size, up=axis))).mean()
            for axis in (up, "+x" if up == "+z" else "+z"))
        assert right == 0 and wrong > 1, (key, right, wrong)
