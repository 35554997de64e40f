"""Bad values for the options of issue 17 (the originals' protocols): ``extract --protocol``,
``--protocol-steps``, ``--threads``; ``align --protocol/--ties``; ``probe --probe glocal`` and
its options; ``lens --pooled``; ``anomalies --label-grid``. Each is refused with exit 2, one line
naming the value, and nothing created. All fail before any model work (the img2img timestep
cases load the embedded ``tiny`` for its scheduler, about 1 s)."""

from __future__ import annotations

import pytest

EXTRACT = ["extract", "--model", "tiny", "--data", "shapes:4", "--out", "run",
           "--sites", "unet.mid_block"]  # fmt: skip
ALIGN = ["align", "nowhere", "--things", "nothing"]
PROBE = ["probe", "nowhere", "--things", "nothing"]

CASES = {
    "unknown protocol": ([*EXTRACT, "--noise", "0.1", "--protocol", "img2img"],
                         ["--protocol", "img2img", "alignment-paper"]),
    "protocol with timesteps": ([*EXTRACT, "--timesteps", "10", "--protocol", "alignment-paper"],
                                ["--protocol alignment-paper", "--noise"]),
    "protocol steps zero": ([*EXTRACT, "--noise", "0.1", "--protocol", "alignment-paper",
                             "--protocol-steps", "0"], ["--protocol-steps", "0"]),
    "protocol noise level zero": ([*EXTRACT, "--noise", "0,0.2", "--protocol", "alignment-paper"],
                                  ["noise level 0", "0.01"]),
    "protocol levels on one img2img step": (
        [*EXTRACT, "--noise", "0.011,0.015", "--protocol", "alignment-paper"],
        ["0.011", "0.015", "img2img timestep"]),
    "zero threads": ([*EXTRACT, "--noise", "0.1", "--threads", "0"], ["--threads", "0"]),
    "unknown align protocol": ([*ALIGN, "--protocol", "gLocal"], ["--protocol", "gLocal"]),
    "unknown tie rule": ([*ALIGN, "--ties", "loose"], ["--ties", "loose", "glocal"]),
    "unknown probe": ([*PROBE, "--probe", "vice"], ["vice", "glocal"]),
    "glocal probe with pca": ([*PROBE, "--probe", "glocal", "--pca", "8"], ["--pca", "glocal"]),
    "glocal probe with a regulariser": ([*PROBE, "--probe", "glocal", "--regulariser",
                                         "identity"], ["--regulariser", "glocal"]),
    "lambdas not numbers": ([*PROBE, "--probe", "glocal", "--lambdas", "a,b"],
                            ["--lambdas", "a,b"]),
    "negative lambdas": ([*PROBE, "--probe", "glocal", "--lambdas", "0.1,-1"],
                         ["--lambdas", "-1"]),
    "alpha above one": ([*PROBE, "--probe", "glocal", "--alpha", "2"], ["--alpha", "2"]),
    "zero tau": ([*PROBE, "--probe", "glocal", "--tau", "0"], ["--tau", "0"]),
    "negative lambda": ([*PROBE, "--lambda", "-1"], ["--lambda", "-1"]),
    "zero max epochs": ([*PROBE, "--max-epochs", "0"], ["--max-epochs", "0"]),
    "unknown pooled": (["lens", "--model", "tiny", "--prompt", "a", "--pooled", "mean"],
                       ["--pooled", "mean", "empty"]),
    "zero label grid": (["anomalies", "nowhere", "--label-grid", "0"], ["--label-grid", "0"]),
}  # fmt: skip


@pytest.mark.parametrize(("args", "names"), [pytest.param(a, n, id=k) for k, (a, n) in
                                             CASES.items()])  # fmt: skip
def test_fidelity_options_refuse(refused, args, names):
    refused(args, names)
