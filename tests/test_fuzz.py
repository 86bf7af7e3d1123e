"""A short fuzzing run of every reader and the image path (about a minute; long campaigns:
benchmarks/fuzz.py). Seeds come from the real libraries (tests/fuzz/seeds.py); the run must end
with no interpreter crash, no hang, no exception other than the project's, no input slower than
2 s and no input whose peak memory exceeds 10 x its size + 200 MB."""
from fuzz.campaign import retime, run_campaign
from fuzz.seeds import write_seeds
from fuzz.targets import TARGETS

SECONDS = 50


def test_short_fuzzing_run_finds_nothing(tmp_path):
    seeds = write_seeds(str(tmp_path / "seeds"))
    assert set(seeds) == set(TARGETS)
    summary = run_campaign(seeds, str(tmp_path / "out"), seconds=SECONDS, seed=20261201)
    findings = {k: summary[k] for k in ("crashes", "hangs", "foreign", "slow", "memory", "harness_errors")}
    assert findings == dict.fromkeys(findings, 0), (findings, sorted((tmp_path / "out").iterdir()))
    assert summary["peak_measured"]
    # every target ran often enough to mean something even on a loaded machine
    assert min(summary["per_target"].values()) >= 100, summary["per_target"]
    assert summary["max_seconds"] <= 2.0 and summary["max_peak_ratio"] <= 1.0
    # inputs slow only by the clock (a busy machine) must be fast when run again
    assert all(best <= 2.0 for _, _, best in retime(str(tmp_path / "out"))), retime(str(tmp_path / "out"))
