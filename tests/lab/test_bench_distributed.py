"""``batchnorm bench --distributed``: two real gloo processes, the report's structure and collective counts.

No timing is asserted (the machine is shared); only that every runnable variant
produced positive times, that torch's SyncBatchNorm is reported as not
runnable on the CPU with torch's own message, and the collectives per BN call.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchnorm.lab import bench_distributed
from batchnorm.lab.bench_distributed import DistributedOptions
from helpers import run_cli


def test_the_cli_times_every_variant_and_counts_collectives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dist.json"
    code, out, _ = run_cli(["bench", "--distributed", "--steps", "1", "--repeats", "1", "--json", str(path)], capsys)
    assert code == 0
    report = json.loads(path.read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert list(results) == list(bench_distributed.VARIANTS)
    for variant in ("local BN (ours)", "SyncBatchNorm (ours)"):
        assert results[variant]["not_runnable"] is None
        assert results[variant]["ms_per_step"] > 0
    torch_side = results["torch SyncBatchNorm"]
    assert torch_side["ms_per_step"] is None
    assert "GPU" in torch_side["not_runnable"]  # torch's own words: DDP and the layer refuse the CPU
    assert report["collectives_per_bn_call"] == {"layers": 2, "forward": 1, "backward": 1}
    assert report["cpu"]
    assert "1 forward (all_gather), 1 backward (all_reduce)" in out
    assert f"wrote {path}" in out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DistributedOptions(processes=1), "at least 2 processes"),
        (DistributedOptions(batch=3), "global batch of at least 4"),
    ],
)
def test_bad_options_are_refused_before_any_process_starts(options: DistributedOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench_distributed.run(options)
