"""Samples files stored gzipped beside their profile (the committed calibrations under docs/ are, to
keep the tree that travels to the GPU machine under its cap): read, hashed by content and refitted
exactly as the plain file."""

import gzip
import shutil
from pathlib import Path

import pytest

from djinnsim.calibrate.refit import read_samples, refit_file
from djinnsim.errors import DjinnsimError
from djinnsim.sim.profile import load_profile, samples_path, samples_sha256
from djinnsim.sim.provenance import file_sha256

BUNDLED = Path(__file__).resolve().parents[1] / "sim" / "data" / "profiles" / "h200-llama-2-7b.json"


def _copy(folder: Path, gzipped: bool) -> Path:
    folder.mkdir()
    profile = folder / BUNDLED.name
    shutil.copyfile(BUNDLED, profile)
    csv = BUNDLED.with_suffix(".csv")
    if gzipped:
        with csv.open("rb") as src, gzip.GzipFile(folder / (csv.name + ".gz"), "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(csv, folder / csv.name)
    return profile


def test_gzipped_samples_are_found_hashed_by_content_and_read_alike(tmp_path):
    plain, packed = _copy(tmp_path / "plain", False), _copy(tmp_path / "packed", True)
    file = samples_path(load_profile(packed), packed)
    assert file is not None and file.name.endswith(".csv.gz")
    assert samples_sha256(file) == file_sha256(BUNDLED.with_suffix(".csv")) != file_sha256(file)
    assert read_samples(file) == read_samples(samples_path(load_profile(plain), plain))


def test_refit_from_gzipped_samples_writes_the_same_profile_and_plain_samples(tmp_path):
    plain, packed = _copy(tmp_path / "plain", False), _copy(tmp_path / "packed", True)
    refit_file(plain, out=tmp_path / "a" / BUNDLED.name, left_out=("exp21_step",))
    refit_file(packed, out=tmp_path / "b" / BUNDLED.name, left_out=("exp21_step",))
    a, b = (tmp_path / side / BUNDLED.name for side in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".csv").read_bytes() == b.with_suffix(".csv").read_bytes() == BUNDLED.with_suffix(".csv").read_bytes()


def test_gzipped_samples_of_another_calibration_or_corrupt_are_refused(tmp_path):
    packed = _copy(tmp_path / "packed", True)
    gz = packed.parent / (BUNDLED.with_suffix(".csv").name + ".gz")
    with gzip.open(gz, "ab") as handle:
        handle.write(b"x,y\n")
    with pytest.raises(DjinnsimError, match="not the samples file"):
        samples_path(load_profile(packed), packed)
    gz.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(DjinnsimError, match="cannot read the samples file"):
        samples_path(load_profile(packed), packed)


def test_damaged_deflate_data_is_one_line_everywhere(tmp_path):
    """A gzipped samples file whose compressed stream is damaged (a zlib.error, not an OSError): refused
    in one line by the lookup, by the reader, and by a refit."""
    packed = _copy(tmp_path / "packed", True)
    gz = packed.parent / (BUNDLED.with_suffix(".csv").name + ".gz")
    data = bytearray(gz.read_bytes())
    for i in range(40, min(len(data) - 20, 4000)):  # keep the header, garble the deflate stream
        data[i] ^= 0x5A
    gz.write_bytes(bytes(data))
    with pytest.raises(DjinnsimError, match="cannot read the samples file"):
        samples_path(load_profile(packed), packed)
    with pytest.raises(DjinnsimError, match="cannot read the samples file"):
        read_samples(gz)
    with pytest.raises(DjinnsimError, match="cannot read the samples file"):
        refit_file(packed, out=tmp_path / "out" / BUNDLED.name)
