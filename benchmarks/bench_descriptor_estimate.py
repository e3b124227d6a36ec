"""The descriptor pass's time estimate (``hpo.models.gap.kind.descriptor_pass_seconds``) against the pass itself.

On the workshop's 50 training frames (12-atom water cells): for a few cutoffs, energies only and with
gradients, the estimate made before a fit (the largest frame timed at a cutoff of at most 4 A, scaled by
atoms and neighbours) and the measured wall time of quippy's descriptors of every frame, and their ratio.

    python benchmarks/bench_descriptor_estimate.py
"""

from __future__ import annotations

import os
import time

import ase.io

from hpo.config import load_config
from hpo.data import find_data_dir
from hpo.models.gap import gap_fit
from hpo.models.gap import kind as gap_kind
from hpo.models.gap.descriptors import environments

SOAP = dict(descriptor="soap", l_max=6, n_max=4, atom_sigma=0.3, cutoff=5.0, cutoff_transition_width=1.0, central_weight=1.0,
            n_sparse=50, delta=1.0, covariance_type="dot_product", zeta=2, sparse_method="cur_points", descriptors=[])


def main() -> None:
    data_dir = find_data_dir(load_config([]).dataset, ["gap_input_50.xyz"])  # HPO_DATA_DIR, else ../shared/data/water
    frames = ase.io.read(data_dir / "gap_input_50.xyz", ":")
    print(f"load average {os.getloadavg()[0]:.1f}; {len(frames)} frames of {len(frames[0])} atoms")
    print(f"{'cutoff (A)':>10} {'gradients':>9} {'estimate (s)':>12} {'measured (s)':>12} {'measured/estimate':>17}")
    for cutoff, gradients in ((3.0, False), (4.0, False), (8.0, False), (12.0, False), (4.0, True), (6.0, True)):
        params = {**SOAP, "cutoff": cutoff, "fit_forces": gradients}
        estimate = gap_kind.descriptor_pass_seconds(params, frames)
        start = time.perf_counter()
        for descriptor in gap_fit.expected_descriptors(params, frames):
            environments(descriptor, frames, None, gradients=gradients)
        measured = time.perf_counter() - start
        print(f"{cutoff:>10.1f} {str(gradients):>9} {estimate:>12.2f} {measured:>12.2f} {measured / estimate:>17.2f}")


if __name__ == "__main__":
    main()
