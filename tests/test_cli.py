import json
import logging
import subprocess
import sys

from click.testing import CliRunner
from torch.utils.data import DataLoader

from vild_pipe import __version__
from vild_pipe.cli import main
from vild_pipe.pipeline.head import load_head
from vild_pipe.stages import demo


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("make-synthetic", "fit-teacher", "train-rpn", "recall", "dump-proposals", "cache-embeddings",
                    "embed-text", "train-head", "evaluate", "detect", "demo"):
        assert command in result.output
    assert CliRunner().invoke(main, ["--version"]).output.strip().endswith(__version__)


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "vild_pipe", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"vild-pipe, version {__version__}"


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["train-rpn", str(bad), str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "train.json" in lines[0]


def test_a_missing_or_wrong_kind_of_path_is_one_line_naming_it_and_exit_2(tmp_path):
    (tmp_path / "val.json").write_text("{}")
    out = str(tmp_path / "out")
    cases = {
        ("evaluate", str(tmp_path / "nope"), str(tmp_path / "val.json"), out):
            f"error: {tmp_path / 'nope'}: no such file or directory (PROPOSALS)",
        ("evaluate", str(tmp_path / "val.json"), str(tmp_path / "val.json"), out):
            f"error: {tmp_path / 'val.json'}: is a file, a folder is needed (PROPOSALS)",
        ("evaluate", str(tmp_path), str(tmp_path), out):
            f"error: {tmp_path}: is a folder, a file is needed (ANNOTATIONS)",
        ("detect", "x.jpg", "--detector", str(tmp_path / "rpn"), "--head", "h", "--clip", "c"):
            f"error: {tmp_path / 'rpn'}: no such file or directory (--detector)",
    }
    for args, line in cases.items():
        result = CliRunner().invoke(main, list(args))
        assert (result.exit_code, result.output.strip()) == (2, line)
    assert not (tmp_path / "out").exists()


def test_quick_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    worker_starts = []
    make_loader = DataLoader.__init__

    def recording_loader(loader, *args, **kwargs):
        make_loader(loader, *args, **kwargs)
        if loader.num_workers:
            worker_starts.append(loader.multiprocessing_context and loader.multiprocessing_context.get_start_method())

    monkeypatch.setattr(DataLoader, "__init__", recording_loader)
    first = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert first.exit_code == 0, first.output
    if sys.platform.startswith("linux"):   # forked workers whatever Python's default (forkserver from 3.14)
        assert len(worker_starts) >= 7 and set(worker_starts) == {"fork"}, worker_starts
    assert "| fit-teacher (beside train-rpn) |" in first.output and "recall@0.5" in first.output
    for mode in ("CLIP-on-crops", "ViLD-text", "ViLD-image", "ViLD", "ViLD-ensemble"):
        assert f"| {mode} |" in first.output
    for path in ("world/train.json", "teacher.pt", "teacher.json", "rpn/model.pt", "rpn/recall.json",
                 "proposals/train/manifest.json", "proposals/val/manifest.json", "embeddings/train/manifest.json",
                 "embeddings/val/manifest.json", "heads/text/head.pt", "heads/image/head.pt",
                 "heads/text-image/head.pt", "evaluation/metrics.json", "evaluation/results-ViLD.json",
                 "detections/detections.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "proposals/train/manifest.json").read_text())["stage"] == "dump-proposals"
    assert json.loads((out / "embeddings/val/manifest.json").read_text())["stage"] == "cache-embeddings"
    assert len(list((out / "detections").glob("*.png"))) == 2
    assert load_head(out / "heads/text/head.pt")[1]["proposal_nms"] == demo.PROPOSAL_NMS   # detect's default
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in {".pt", ".h5"}}
    second = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a rerun must resume, not redo"


def test_the_log_shows_vild_pipes_lines_and_only_other_libraries_warnings():
    """torch logs its FakeTensor cache stats at info when a run is stopped: not the user's business."""
    from vild_pipe.errors import ours_or_a_warning

    def shown(name, level):
        return ours_or_a_warning(logging.LogRecord(name, level, __file__, 0, "line", None, None))

    assert shown("vild_pipe.stages.detect", logging.INFO) and shown("vild_pipe", logging.DEBUG)
    assert not shown("torch._subclasses.fake_tensor", logging.INFO) and not shown("vild_pipe_other", logging.INFO)
    assert shown("torch", logging.WARNING)


def test_every_command_takes_v_after_its_name_too(tmp_path, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)   # put back after the test
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"weights")
    result = CliRunner().invoke(main, ["info", "-v", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert root.level == logging.DEBUG
    for command in main.commands.values():
        assert "--verbose" in [opt for param in command.params for opt in param.opts], command.name
