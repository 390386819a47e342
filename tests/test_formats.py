import io
import logging
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from clipgs.cli import main
from clipgs.data.formats import load_gaussians, read_gaussians, read_ply, write_ply
from clipgs.data.gaussians import NUM_ATTRIBUTES, GaussianCloud
from clipgs.errors import GaussianFormatError

FIELDS = ("xyz", "f_dc", "opacity", "scale", "rotation", "f_rest", "normals")


def _real_files(shared_data):
    return sorted(shared_data.glob("gaussians/*.ply")) + sorted(shared_data.glob("splats/*/*.splat"))


def test_reads_every_real_file(shared_data):
    files = _real_files(shared_data)
    assert len(files) == 16
    for f in files:
        cloud = read_gaussians(f.read_bytes(), str(f))
        act = cloud.activated()
        assert act.shape == (len(cloud), NUM_ATTRIBUTES)
        assert np.isfinite(act).all()
        assert np.allclose(np.linalg.norm(act[:, 10:14], axis=1), 1, atol=1e-5)
        assert np.sqrt((act[:, :3] ** 2).sum(1)).max() == pytest.approx(1, abs=1e-5)
        assert (act[:, 3:7] >= 0).all() and (act[:, 3:7] <= 1).all()
        from_path = load_gaussians(f)  # the local fast path reads the same values
        for name in FIELDS:
            a, b = getattr(cloud, name), getattr(from_path, name)
            assert (a is None and b is None) or np.array_equal(a, b), (f, name)


def test_known_counts_and_sh_degree(shared_data):
    donut = read_gaussians((shared_data / "gaussians/donut.ply").read_bytes(), "donut.ply")
    assert len(donut) == 45624 and donut.sh_degree == 0 and donut.normals is None
    tile = read_gaussians((shared_data / "gaussians/gs3d_lod5_tile.ply").read_bytes(), "t.ply")
    assert len(tile) == 111 and tile.sh_degree == 3 and tile.normals is not None


def test_non_unit_quaternions_are_normalised_with_a_warning(shared_data, caplog):
    path = shared_data / "gaussians/gs3d_lod4_tile.ply"
    with caplog.at_level(logging.WARNING):
        cloud = read_gaussians(path.read_bytes(), str(path))
    assert "not unit length" in caplog.text and "gs3d_lod4_tile.ply" in caplog.text
    assert not np.allclose(np.linalg.norm(cloud.rotation, axis=1), 1, atol=1e-3)  # kept raw
    assert np.allclose(np.linalg.norm(cloud.activated()[:, 10:14], axis=1), 1, atol=1e-6)


def _plyfile_bytes(cloud: GaussianCloud, text: bool, byte_order: str) -> bytes:
    """The same cloud written by plyfile (an independent writer) in any PLY flavour."""
    buf = io.BytesIO()
    write_ply(cloud, buf)
    vertex = PlyData.read(io.BytesIO(buf.getvalue()))["vertex"].data
    out = io.BytesIO()
    PlyData([PlyElement.describe(vertex, "vertex")], text=text, byte_order=byte_order).write(out)
    return out.getvalue()


def _cloud(n=10, sh_rest=0, normals=False, seed=0) -> GaussianCloud:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    cloud = GaussianCloud(
        xyz=rng.normal(size=(n, 3)).astype(np.float32),
        f_dc=rng.normal(size=(n, 3)).astype(np.float32),
        opacity=rng.normal(size=n).astype(np.float32),
        scale=rng.normal(-4, 1, size=(n, 3)).astype(np.float32),
        rotation=q / np.linalg.norm(q, axis=1, keepdims=True),
        f_rest=rng.normal(size=(n, sh_rest)).astype(np.float32),
        normals=rng.normal(size=(n, 3)).astype(np.float32) if normals else None)
    return cloud


@pytest.mark.parametrize("sh_rest", [0, 9, 24, 45])
@pytest.mark.parametrize("flavour", [("binary", "<"), ("binary", ">"), ("ascii", "=")])
@pytest.mark.parametrize("normals", [False, True])
def test_every_ply_flavour_reads_back_exactly(sh_rest, flavour, normals):
    cloud = _cloud(50, sh_rest, normals)
    data = _plyfile_bytes(cloud, text=flavour[0] == "ascii", byte_order=flavour[1])
    got = read_gaussians(data, "x.ply")
    assert got.sh_degree == {0: 0, 9: 1, 24: 2, 45: 3}[sh_rest]
    for name in FIELDS:
        a, b = getattr(cloud, name), getattr(got, name)
        if a is None:
            assert b is None
        elif flavour[0] == "ascii":  # plyfile prints floats with enough digits for float32
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(b, a)


def test_ply_round_trip_is_lossless(shared_data, tmp_path):
    for path in sorted(shared_data.glob("gaussians/*.ply")):
        a = read_gaussians(path.read_bytes(), str(path))
        out = tmp_path / path.name
        write_ply(a, out)
        b = load_gaussians(out)
        for name in FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(x, y), (path, name)
        # and byte for byte against INRIA's own layout when the source was ours to begin with
        again = io.BytesIO()
        write_ply(b, again)
        assert again.getvalue() == out.read_bytes()


def test_compressed_ply_and_spz_through_gsply(shared_data, tmp_path):
    import gsply

    src = read_gaussians((shared_data / "gaussians/gs3d_lod4_tile.ply").read_bytes(), "t.ply")
    n = len(src)
    data = gsply.GSData(means=src.xyz, scales=src.scale, quats=src.activated()[:, 10:14],
                        opacities=src.opacity, sh0=src.f_dc,
                        shN=src.f_rest.reshape(n, 3, 15).transpose(0, 2, 1).copy())
    compressed = gsply.compress_to_bytes(data)
    got = read_gaussians(compressed, "scene.compressed.ply")
    assert len(got) == n and got.sh_degree == 3
    span = src.xyz.max(0) - src.xyz.min(0)
    assert (np.abs(got.xyz - src.xyz) <= span / 1000).all()  # 11-bit quantised positions
    assert np.abs(got.f_dc - src.f_dc).max() < 0.05
    gsply.write_spz(tmp_path / "scene.spz", data)
    spz = load_gaussians(tmp_path / "scene.spz")
    assert len(spz) == n and np.abs(spz.xyz - src.xyz).max() < 1e-2
    np.testing.assert_allclose(spz.activated()[:, 3:7], src.activated()[:, 3:7], atol=0.03)
    for bad in (compressed[: len(compressed) // 2], (tmp_path / "scene.spz").read_bytes()[:40]):
        with pytest.raises(GaussianFormatError):
            read_gaussians(bad, "bad.spz" if len(bad) == 40 else "bad.ply")


def _ply_bytes(cloud: GaussianCloud) -> bytes:
    buf = io.BytesIO()
    write_ply(cloud, buf)
    return buf.getvalue()


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d[: len(d) - 7], "vertex", "truncated"),
    (lambda d: d.replace(b"property float opacity\n", b"property float opacitx\n"), "opacity",
     "missing"),
    (lambda d: d.replace(b"property float scale_0\n", b"property uchar scale_0\n"), "scale_0",
     "expected a float"),
    (lambda d: d.replace(b"element vertex 10", b"element vertex 99"), "vertex",
     "lies about the count"),
    (lambda d: d.replace(b"element vertex 10", b"element vertex 5"), "vertex",
     "lies about the count"),
    (lambda d: d.replace(b"element vertex 10", b"element vertex 999999999999"), "vertex",
     "over the limit"),
    (lambda d: d.replace(b"property float x", b"property quad x"), "x", "expected 'property"),
    (lambda d: d.replace(b"format binary_little_endian", b"format binary_middle_endian"),
     "format", "expected one of"),
    (lambda d: d.replace(b"end_header", b"end_headex"), None, "no 'end_header'"),
    (lambda d: b"hello" + d, None, "does not start with 'ply'"),
])
def test_bad_ply_gets_one_clear_error(mutate, field, words):
    with pytest.raises(GaussianFormatError) as err:
        read_gaussians(mutate(_ply_bytes(_cloud())), "bad.ply")
    message = str(err.value)
    assert message.startswith("bad.ply: ") and words in message and "\n" not in message
    assert err.value.field == field


def test_ascii_ply_that_lies_about_its_count():
    data = _plyfile_bytes(_cloud(5), text=True, byte_order="=")
    for lie in (b"element vertex 9", b"element vertex 3"):
        with pytest.raises(GaussianFormatError, match="lies about the count"):
            read_gaussians(data.replace(b"element vertex 5", lie), "a.ply")


def test_nan_inf_zero_quaternions_and_zero_gaussians_are_refused():
    for name, row, col, value in (("xyz", 3, 1, np.nan), ("scale", 7, 0, np.inf),
                                  ("f_rest", 2, 4, -np.inf)):
        cloud = _cloud(sh_rest=9)
        getattr(cloud, name)[row, col] = value
        with pytest.raises(GaussianFormatError, match=f"non-finite.*gaussian {row}") as err:
            read_gaussians(_ply_bytes(cloud), "nan.ply")
        assert err.value.field == name
    cloud = _cloud()
    cloud.rotation[4] = 0
    with pytest.raises(GaussianFormatError, match="zero-length quaternions"):
        read_gaussians(_ply_bytes(cloud), "q.ply")
    with pytest.raises(GaussianFormatError, match="zero gaussians"):
        read_gaussians(_ply_bytes(_cloud(0)), "empty.ply")


def test_absurd_scales_names_and_headers():
    """A finite log-scale too large for exp() is refused (it would be inf in the shards); "#"
    belongs to a file's name; "end_header" inside a comment is not the end of the header."""
    cloud = _cloud()
    cloud.scale[6, 2] = 100.0
    with pytest.raises(GaussianFormatError, match="log-scale above 80.*gaussian 6") as err:
        read_gaussians(_ply_bytes(cloud), "big.ply")
    assert err.value.field == "scale"
    cloud.scale[6, 2] = 60.0  # large but representable: kept, and activated stays finite
    assert np.isfinite(read_gaussians(_ply_bytes(cloud), "ok.ply").activated()).all()
    data = _ply_bytes(_cloud(4))
    assert len(read_gaussians(data, "scan#1.ply")) == 4
    commented = data.replace(b"format binary", b"comment see end_header below\nformat binary")
    assert len(read_gaussians(commented, "c.ply")) == 4
    empty = b"ply\nformat binary_little_endian 1.0\nelement vertex 2\nend_header\n"
    with pytest.raises(GaussianFormatError, match="no properties") as err:
        read_gaussians(empty, "bare.ply")
    assert err.value.field == "vertex"


def test_render_cli_refuses_bad_arguments_in_one_line(shared_data, tmp_path, capsys):
    src = str(shared_data / "gaussians/splatapult_test.ply")
    for args, words in ((["--view", "7"], "--view 7 of --views 4"),
                        (["--views", "0"], "--views 0"), (["--size", "0"], "--size 0"),
                        (["--out", str(tmp_path / "no" / "v.png")], "no folder"),
                        (["--up=sideways"], "--up sideways: expected auto or one of +x")):
        out = args[1] if args[0] == "--out" else str(tmp_path / "v.png")
        rest = [a for a in args if a not in ("--out", out)] if args[0] == "--out" else args
        assert main(["render", src, "--out", out, *rest]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert main(["render", src, "--out", str(tmp_path / "v.png"), "--size", "32"]) == 0
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    # through a link, as open() would: the link stays, its target gets the image
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    (tmp_path / "target.png").write_bytes(b"")
    assert main(["render", src, "--out", str(tmp_path / "link.png"), "--size", "32"]) == 0
    assert (tmp_path / "link.png").is_symlink()
    assert (tmp_path / "target.png").read_bytes()[:4] == b"\x89PNG"
    # a .splat is -y-up: auto renders it as --up=-y does, not as +z
    cow = str(shared_data / "splats/spot/spot_10k.splat")
    for name, up in (("auto", []), ("y", ["--up=-y"]), ("z", ["--up", "+z"])):
        assert main(["render", cow, "--out", str(tmp_path / f"{name}.png"), "--size", "32", *up]
                    ) == 0
    image = {n: (tmp_path / f"{n}.png").read_bytes() for n in ("auto", "y", "z")}
    assert image["auto"] == image["y"] != image["z"]
    # auto reads the axis as ingest does: a sidecar's "up" (<stem>.json, or meta.json beside
    # an object alone in its folder) before the format's; --up still overrides it
    for sidecar in ("spot_10k.json", "meta.json"):
        folder = tmp_path / sidecar.split(".")[0]
        folder.mkdir()
        (folder / "spot_10k.splat").write_bytes(Path(cow).read_bytes())
        (folder / sidecar).write_text('{"title": "a cow", "up": "z"}')
        capsys.readouterr()
        assert main(["render", str(folder / "spot_10k.splat"), "--out",
                     str(folder / "auto.png"), "--size", "32"]) == 0
        assert f"(up +z, from {folder / sidecar})" in capsys.readouterr().out
        assert (folder / "auto.png").read_bytes() == image["z"]
        assert main(["render", f"file://{folder}/spot_10k.splat", "--out",
                     str(folder / "url.png"), "--size", "32"]) == 0  # a file:// URL alike
        assert (folder / "url.png").read_bytes() == image["z"]
        assert main(["render", str(folder / "spot_10k.splat"), "--out",
                     str(folder / "y.png"), "--size", "32", "--up=-y"]) == 0
        assert (folder / "y.png").read_bytes() == image["y"]
    (tmp_path / "meta" / "meta.json").write_text('{"title": "a cow", "up": "sideways"}')
    capsys.readouterr()
    assert main(["render", str(tmp_path / "meta" / "spot_10k.splat"), "--out",
                 str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta.json: field 'up' is \"sideways\"" in err, err


def test_truncated_splat_and_unknown_suffix(shared_data):
    data = (shared_data / "splats/cat/cat_10k.splat").read_bytes()
    with pytest.raises(GaussianFormatError, match="not a multiple of 32"):
        read_gaussians(data[:-5], "cat.splat")
    with pytest.raises(GaussianFormatError, match="unknown suffix"):
        read_gaussians(data, "cat.doc")
    with pytest.raises(GaussianFormatError, match="no such file"):
        load_gaussians("/nonexistent/cat.ply")


def test_read_ply_of_bytes_whatever_the_name():
    assert len(read_ply(_ply_bytes(_cloud(4)), "upload")) == 4


def test_inspect_cli(shared_data, tmp_path, capsys):
    assert main(["inspect", str(shared_data / "gaussians/donut.ply")]) == 0
    assert '"gaussians": 45624' in capsys.readouterr().out
    bad = tmp_path / "broken.ply"
    bad.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n"
                    b"property float opacity\nend_header\n1 2\n2 3\n")
    good = str(shared_data / "gaussians/splatapult_test.ply")
    assert main(["inspect", str(bad), good]) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert len(err.splitlines()) == 1 and "broken.ply" in err and "missing" in err
    assert '"gaussians": 16' in out  # the good file after the bad one is still inspected
    # the file-size memory guard holds for inspect too, before a byte is read
    from clipgs.data import formats

    donut = str(shared_data / "gaussians/donut.ply")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(formats, "MAX_FILE_BYTES", 1_000_000)
        assert main(["inspect", donut]) == 2
    assert "over the limit of 1,000,000 (CLIPGS_MAX_FILE_MB)" in capsys.readouterr().err


def _fuzz_inputs(shared_data, tmp_path):
    import gsply

    files = _real_files(shared_data)
    inputs = [(f.name, f.read_bytes()) for f in files if f.stat().st_size < 400_000]
    tile = read_gaussians((shared_data / "gaussians/gs3d_lod5_tile.ply").read_bytes(), "t.ply")
    data = gsply.GSData(means=tile.xyz, scales=tile.scale, quats=tile.activated()[:, 10:14],
                        opacities=tile.opacity, sh0=tile.f_dc,
                        shN=np.zeros((len(tile), 0, 3), np.float32))
    inputs.append(("tile.compressed.ply", gsply.compress_to_bytes(data)))
    gsply.write_spz(tmp_path / "tile.spz", data)
    inputs.append(("tile.spz", (tmp_path / "tile.spz").read_bytes()))
    inputs.append(("ascii.ply", _plyfile_bytes(_cloud(20, 9, True), True, "=")))
    inputs.append(("big_endian.ply", _plyfile_bytes(_cloud(20, 45), False, ">")))
    return inputs


def test_fuzzed_real_files_only_raise_our_error(shared_data, tmp_path):
    """Mutated and truncated real files: each either reads or raises GaussianFormatError with a
    one-line message naming the file - never anything else."""
    rng = np.random.default_rng(1)
    for name, data in _fuzz_inputs(shared_data, tmp_path):
        for trial in range(30):
            d = bytearray(data)
            if trial % 3 != 2:  # flip bytes, often in the header where the structure is
                span = min(len(d), 400) if trial % 2 else len(d)
                for i in rng.integers(0, span, size=int(rng.integers(1, 12))):
                    d[i] = int(rng.integers(256))
            if trial % 3 != 0:
                d = d[: int(rng.integers(0, len(d) + 1))]
            try:
                read_gaussians(bytes(d), name)
            except GaussianFormatError as err:
                assert str(err).startswith(name) and "\n" not in str(err)
