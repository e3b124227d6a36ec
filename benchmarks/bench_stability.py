"""Cost of the MD stability check per frame, for the 12-atom water cell and a ~400-atom supercell of it.

Times ``hpo.stability.nearest_neighbour_extremes`` and ``hpo.stability.judge``
(which adds the hydrogen rule) on rattled copies of the validation frames,
and, for scale, ASE's all-pairs minimum-image distance matrix of the same frames.

    HPO_DATA_DIR=../shared/data/water python benchmarks/bench_stability.py [--frames 200]
"""

from __future__ import annotations

import argparse
import time

import ase.io

from hpo.stability import StabilityCriteria, judge, nearest_neighbour_extremes, training_ranges


def best_ms_per_frame(function, frames, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(frames)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from hpo.config import load_config
    from hpo.data import find_data_dir

    data = find_data_dir(load_config([]).dataset, ["gap_validate.xyz"])  # HPO_DATA_DIR, else ../shared/data/water
    validation = ase.io.read(data / "gap_validate.xyz", ":")
    ranges = training_ranges(ase.io.read(data / "gap_input_50.xyz", ":"))
    # thresholds only matter for the verdict, not for the cost
    criteria = StabilityCriteria(max_departure_A=0.5, max_h_distance_A=2.5, min_temperature_K=0.0, max_temperature_K=2000.0)
    print(f"{'atoms':>6} {'nn_extremes ms/frame':>21} {'judge ms/frame':>15} {'ASE all-distances ms/frame':>27}")
    for repeat in [(1, 1, 1), (3, 3, 4)]:
        frames = []
        for i in range(args.frames):
            atoms = validation[i % len(validation)].repeat(repeat)
            atoms.rattle(0.02, seed=i)  # no two frames alike
            frames.append(atoms)
        nn = best_ms_per_frame(nearest_neighbour_extremes, frames, args.repeats)
        verdict = best_ms_per_frame(
            lambda fs: judge(fs, [300.0] * len(fs), list(range(len(fs))), ranges, criteria), frames, args.repeats
        )
        ase_all = best_ms_per_frame(lambda fs: [a.get_all_distances(mic=True) for a in fs], frames[:20], 1)
        print(f"{len(frames[0]):>6} {nn:>21.2f} {verdict:>15.2f} {ase_all:>27.2f}")


if __name__ == "__main__":
    main()
