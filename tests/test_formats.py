import io
import logging

import numpy as np
import pytest

from clipgs.cli import main
from clipgs.data.formats import read_gaussians, read_ply, write_ply
from clipgs.data.gaussians import NUM_ATTRIBUTES, GaussianCloud
from clipgs.errors import GaussianFormatError


def test_reads_every_real_file(shared_data):
    files = sorted(shared_data.glob("gaussians/*.ply")) + sorted(shared_data.glob("splats/*/*.splat"))
    assert len(files) == 16
    for f in files:
        cloud = read_gaussians(f.read_bytes(), str(f))
        act = cloud.activated()
        assert act.shape == (len(cloud), NUM_ATTRIBUTES)
        assert np.isfinite(act).all()
        assert np.allclose(np.linalg.norm(act[:, 10:14], axis=1), 1, atol=1e-5)
        assert np.sqrt((act[:, :3] ** 2).sum(1)).max() == pytest.approx(1, abs=1e-5)
        assert (act[:, 3:7] >= 0).all() and (act[:, 3:7] <= 1).all()


def test_known_counts_and_sh_degree(shared_data):
    donut = read_gaussians((shared_data / "gaussians/donut.ply").read_bytes(), "donut.ply")
    assert len(donut) == 45624 and donut.sh_degree == 0 and donut.normals is None
    tile = read_gaussians((shared_data / "gaussians/gs3d_lod5_tile.ply").read_bytes(), "t.ply")
    assert len(tile) == 111 and tile.sh_degree == 3 and tile.normals is not None


def test_non_unit_quaternions_are_normalised_with_a_warning(shared_data, caplog):
    path = shared_data / "gaussians/gs3d_lod4_tile.ply"
    with caplog.at_level(logging.WARNING):
        cloud = read_gaussians(path.read_bytes(), str(path))
    assert "not unit length" in caplog.text
    assert not np.allclose(np.linalg.norm(cloud.rotation, axis=1), 1, atol=1e-3)  # kept raw
    assert np.allclose(np.linalg.norm(cloud.activated()[:, 10:14], axis=1), 1, atol=1e-6)


def test_ply_round_trip_is_lossless(shared_data):
    path = shared_data / "gaussians/gs3d_lod5_tile.ply"
    a = read_gaussians(path.read_bytes(), str(path))
    buf = io.BytesIO()
    write_ply(a, buf)
    b = read_ply(buf.getvalue(), "roundtrip.ply")
    for name in ("xyz", "f_dc", "opacity", "scale", "rotation", "f_rest", "normals"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def _ply_bytes(cloud: GaussianCloud) -> bytes:
    buf = io.BytesIO()
    write_ply(cloud, buf)
    return buf.getvalue()


def _cloud(n=10) -> GaussianCloud:
    rng = np.random.default_rng(0)
    return GaussianCloud.from_activated(rng.normal(size=(n, 3)), rng.random((n, 3)),
                                        np.full(n, 0.5), np.full((n, 3), 0.01),
                                        np.tile([1.0, 0, 0, 0], (n, 1)))


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d[: len(d) - 7], None, "not a readable .ply"),
    (lambda d: d.replace(b"property float opacity\n", b"property float opacitx\n"), "opacity",
     "missing"),
    (lambda d: d.replace(b"property float scale_0\n", b"property uchar scale_0\n"), "scale_0",
     "expected a float"),
    (lambda d: d.replace(b"element vertex 10", b"element vertex 99"), None, "not a readable"),
    (lambda d: b"hello" + d, None, "not a readable"),
])
def test_bad_ply_gets_one_clear_error(mutate, field, words):
    with pytest.raises(GaussianFormatError) as err:
        read_gaussians(mutate(_ply_bytes(_cloud())), "bad.ply")
    assert "bad.ply" in str(err.value) and words in str(err.value)
    if field:
        assert err.value.field == field


def test_nan_and_zero_gaussians_are_refused():
    cloud = _cloud()
    cloud.xyz[3, 1] = np.nan
    with pytest.raises(GaussianFormatError, match="non-finite.*gaussian 3"):
        read_gaussians(_ply_bytes(cloud), "nan.ply")
    with pytest.raises(GaussianFormatError, match="zero gaussians"):
        read_gaussians(_ply_bytes(_cloud(0)), "empty.ply")


def test_truncated_splat_and_unknown_suffix(shared_data):
    data = (shared_data / "splats/cat/cat_10k.splat").read_bytes()
    with pytest.raises(GaussianFormatError, match="not a multiple of 32"):
        read_gaussians(data[:-5], "cat.splat")
    with pytest.raises(GaussianFormatError, match="unknown suffix"):
        read_gaussians(data, "cat.obj")


def test_inspect_cli(shared_data, tmp_path, capsys):
    assert main(["inspect", str(shared_data / "gaussians/donut.ply")]) == 0
    assert '"gaussians": 45624' in capsys.readouterr().out
    bad = tmp_path / "broken.ply"
    bad.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nend_header\n1\n2\n")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.ply" in err and "missing" in err


def test_fuzzed_real_files_only_raise_our_error(shared_data):
    rng = np.random.default_rng(1)
    files = [shared_data / "gaussians/splatapult_test.ply", shared_data / "gaussians/gs3d_lod5_tile.ply",
             shared_data / "splats/cube/cube_10k.splat"]
    for f in files:
        data = bytearray(f.read_bytes())
        for _ in range(40):
            d = bytearray(data)
            for i in rng.integers(0, len(d), size=int(rng.integers(1, 20))):
                d[i] = int(rng.integers(256))
            d = d[: int(rng.integers(1, len(d) + 1))] if rng.random() < 0.5 else d
            try:
                read_gaussians(bytes(d), f.name)
            except GaussianFormatError:
                pass
