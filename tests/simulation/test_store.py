"""The shard store maps an uncompressed .npz where it lies instead of copying it."""

from __future__ import annotations

import json

import numpy as np

from gridfl.simulation import SimulationOptions, partition, simulate
from gridfl.simulation.store import ShardStore, map_npz


def test_an_uncompressed_npz_is_mapped_in_place(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3, 2)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    np.savez(tmp_path / "fortran.npz", x=np.asfortranarray(x), y=y)
    mapped = map_npz(tmp_path / "plain.npz")
    assert mapped is not None
    assert isinstance(mapped["x"], np.memmap) and str(mapped["x"].filename) == str(
        tmp_path / "plain.npz")
    np.testing.assert_array_equal(mapped["x"], x)
    np.testing.assert_array_equal(mapped["y"], y)
    assert map_npz(tmp_path / "packed.npz") is None  # read as before
    assert map_npz(tmp_path / "fortran.npz") is None

    parts = partition(y, 4, "shards", seed=1, shards_per_client=1)
    store = ShardStore.write(tmp_path / "store", mapped["x"], mapped["y"], parts,
                             held_out=0.0)
    arrays = json.loads((tmp_path / "store" / "arrays.json").read_text())
    assert arrays["x"]["file"] == str(tmp_path / "plain.npz")
    assert not (tmp_path / "store" / "x.npy").exists()
    for c in range(4):
        got_x, got_y = store.train(c)
        np.testing.assert_array_equal(got_x, x[parts[c]])
        np.testing.assert_array_equal(got_y, y[parts[c]])


def test_arrays_a_mapped_npz_and_a_compressed_one_give_the_same_run(process, data,
                                                                   tmp_path):
    np.savez(tmp_path / "plain.npz", x=data[0], y=data[1])
    np.savez_compressed(tmp_path / "packed.npz", x=data[0], y=data[1])
    runs = [simulate(**process, data=source, options=SimulationOptions(
        num_clients=40, seed=5, workers=2))
        for source in (data, tmp_path / "plain.npz", tmp_path / "packed.npz")]
    for run in runs[1:]:
        for got, want in zip(run.final_params, runs[0].final_params, strict=True):
            np.testing.assert_array_equal(got, want)
    assert np.abs(runs[0].final_params[0]).sum() > 0.1
