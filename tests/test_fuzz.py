"""Property-based fuzzing of every input path: each generated bad input (tests/hostile.py) is refused with
one `error:` line, exit status 2, no traceback, and nothing written. A fixed, derandomized budget here;
benchmarks/fuzz_campaign.py runs the long campaign."""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from hostile import cases, drive
from prge.testing import save_tiny

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL_DIR = Path(tempfile.mkdtemp(prefix="prge-fuzz-"))
MODEL = save_tiny(MODEL_DIR / "tiny", "llama")
BUDGET = settings(max_examples=30, derandomize=True, deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@BUDGET
@given(case=cases(MODEL, str(DATA)))
def test_every_generated_bad_input_is_refused_cleanly(case):
    with tempfile.TemporaryDirectory() as d:
        outcome = drive(case, Path(d) / "w")
    assert outcome.clean, f"{case.kind}: {outcome.why}\n{outcome.stderr}"
