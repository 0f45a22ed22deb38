"""bench/gpu_check.py, the one command for a GPU machine, on tiny shapes on the CPU: it must work before
a GPU is ever at hand, and it must not need pycocotools (GPU machines may not have it)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_agreement  # noqa: E402
WITHOUT_PYCOCOTOOLS = """
import runpy, sys
sys.modules["pycocotools"] = None  # any import of it fails
sys.argv = [{script!r}, "--dry-run", "--output", {output!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_gpu_check_dry_run(tmp_path):
    output = tmp_path / "gpu_check.md"
    script = WITHOUT_PYCOCOTOOLS.format(script=str(ROOT / "bench" / "gpu_check.py"), output=str(output))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    assert "FAILED" not in report, report
    for step in range(1, 9):
        assert f"_{step}. " in report and "done in" in report
    assert "Not run: no `--official DIR`" in report  # step 8 needs a checkout of the official code
    assert "`pytest -m cuda`: exit code 0" in report
    assert report.count("| r18 ") == 5 + 2  # every memory configuration trained; step 7's eager and compiled steps
    assert "| r18 48x80, batch 2 | compiled |" in report
    assert "| fp32 | compiled |" in report
    assert "100% of the 100 best detections" in report  # compiled and eager agree with the CPU reference
    assert report.strip() in result.stdout  # the table is printed too
    # step 6, stage by stage: on the CPU every run, compiled ones too, finds the reference's detections
    step6 = report[report.index("each run on cpu"):report.index("_6. ")]  # a step's line closes it
    stages = [line for line in step6.splitlines() if line.startswith("| ")][2:]
    assert [line.split(" | ")[0] for line in stages] == ["| " + name for name, *_ in gpu_agreement.RUNS]
    for line in stages:
        found = [cell for cell in line.split(" | ") if cell.endswith("%")]
        assert found and set(found) == {"100%"}, line
