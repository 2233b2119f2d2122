"""drcl installs into the user's own PyTorch and runs without its optional packages.

The package asks for version ranges; constraints.txt holds the exact torch pair we test with. A
source tree runs on a machine with only the torch stack: faster-coco-eval, matplotlib and
tensorboard are imported where they are used, and a missing one costs only its feature.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("faster_coco_eval", "matplotlib", "tensorboard")


def _drcl_without(hidden, *args):
    """``drcl ARGS`` from the source tree in a fresh interpreter that cannot import ``hidden``."""
    code = (f"import sys\nfor name in {tuple(hidden)!r}: sys.modules[name] = None\n"
            "from drcl.cli import main\nraise SystemExit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_and_a_tiny_pretraining_run_need_no_optional_package(tmp_path, tiny_args):
    help_ = _drcl_without(OPTIONAL, "--help")
    assert help_.returncode == 0, help_.stderr
    assert "pretrain" in help_.stdout

    out = tmp_path / "pre"
    sets = [a for s in tiny_args + ["train.max_iters=2", "train.checkpoint_every=2"] for a in ("--set", s)]
    run = _drcl_without(OPTIONAL, "pretrain", "--config", "configs/tiny.yaml", "--out", out, *sets)
    assert run.returncode == 0, run.stderr
    notice = [line for line in run.stdout.splitlines() if "TensorBoard" in line]
    assert len(notice) == 1 and notice[0].startswith("TensorBoard logging is off:")
    assert "pip install tensorboard" in notice[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2]
    assert not (out / "tb").exists()


def _detections(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 6, 20, 10], "score": 0.9},
                                {"image_id": 2, "category_id": 2, "bbox": [0, 0, 80, 60], "score": 0.8}]))
    return path


def test_evaluate_without_faster_coco_eval_is_one_line_naming_it(lvis_files, tmp_path):
    gt, _ = lvis_files
    run = _drcl_without(OPTIONAL, "evaluate", "--gt", gt, "--detections", _detections(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip() == ("drcl evaluate: error: LVIS evaluation needs faster-coco-eval: "
                                  "pip install faster-coco-eval")


def test_evaluate_without_matplotlib_skips_only_the_plot(lvis_files, tmp_path):
    pytest.importorskip("faster_coco_eval")
    gt, _ = lvis_files
    out = tmp_path / "m.json"
    run = _drcl_without(["matplotlib"], "evaluate", "--gt", gt, "--detections", _detections(tmp_path),
                        "--json", out)
    assert run.returncode == 0, run.stderr
    assert "skipped: the AP-vs-frequency plot needs matplotlib: pip install matplotlib" in run.stdout.splitlines()
    assert out.exists() and (tmp_path / "m_per_category.csv").exists()
    assert not (tmp_path / "m_ap_vs_frequency.png").exists()


def test_a_plot_command_without_matplotlib_is_one_line_naming_it(lvis_files, tmp_path):
    gt, _ = lvis_files
    run = _drcl_without(["matplotlib"], "stats", gt, "--plot", tmp_path / "freq.png")
    assert run.returncode == 2
    assert run.stderr.strip() == "drcl stats: error: --plot needs matplotlib: pip install matplotlib"


def test_visualize_without_matplotlib_is_one_line_and_needs_no_evaluator(lvis_files, tmp_path):
    gt, images = lvis_files
    args = ("visualize", "--gt", gt, "--detections", _detections(tmp_path), "--images", images, "--out", tmp_path / "v")
    run = _drcl_without(["matplotlib"], *args)
    assert run.returncode == 2
    assert run.stderr.strip() == "drcl visualize: error: drcl visualize needs matplotlib: pip install matplotlib"
    run = _drcl_without(["faster_coco_eval", "tensorboard"], *args)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "v" / "confusion.csv").exists()


def _base_version(version: str) -> str:
    return version.split("+")[0]  # 2.14.1+cu130 -> 2.14.1


def test_the_package_asks_for_ranges_and_constraints_pin_the_installed_pair():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.match(r"[A-Za-z0-9_.-]+", d).group().lower(): d for d in deps}
    for name in ("torch", "torchvision"):
        assert ">=" in by_name[name] and "==" not in by_name[name], by_name[name]
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pinned = dict(line.split("==") for line in lines if line)
    installed = {"torch": _base_version(torch.__version__), "torchvision": _base_version(torchvision.__version__)}
    try:  # the proposals extra, where it is installed
        installed["opencv-contrib-python-headless"] = importlib.metadata.version("opencv-contrib-python-headless")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert {k: pinned.get(k) for k in installed} == installed, f"constraints.txt pins {pinned}, this environment has {installed}"
    assert set(pinned) == {"torch", "torchvision", "opencv-contrib-python-headless"}, pinned
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("opencv-contrib-python-headless>=") for d in extras["proposals"]), extras["proposals"]


def test_set_up_commands_install_with_the_constraints():
    installs = [line for name in ("README.md", ".ci/run") for line in (ROOT / name).read_text().splitlines()
                if "/bin/pip install" in line]
    assert len(installs) == 3, installs  # the README's two set-up commands and CI's
    assert all("-c constraints.txt" in line for line in installs), installs
