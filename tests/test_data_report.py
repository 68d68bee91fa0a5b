"""The dataset report (keys in docs/dataset-report.md), `sdstudio dataset check` and the dataset registry."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pytest

from sdstudio.cli.dataset import register, run_check
from sdstudio.core.data import registry
from sdstudio.core.data.report import build_report, format_report
from sdstudio.core.data.scan import PROBLEM_KINDS, scan_dataset

try:
    from conftest_data import make_kohya_folder, make_messy_folder, noise_image, save, snapshot
except ImportError:  # tests/ imported as a package
    from tests.conftest_data import make_kohya_folder, make_messy_folder, noise_image, save, snapshot

DOC = Path(__file__).parents[1] / "docs" / "dataset-report.md"
TOP_KEYS = {"version", "root", "layout", "resolution", "counts", "sizes", "aspect_ratios", "captions",
            "buckets", "masks", "problems", "usable", "summary"}
COUNT_KEYS = {"images", "captioned", "uncaptioned", "masked", "problems", "errors", "warnings", "repeats_total",
              "concepts", "problems_by_kind"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("report")
    return {"messy": make_messy_folder(base / "messy"), "kohya": make_kohya_folder(base / "kohya")}


@pytest.fixture(scope="module")
def messy_report(folders: dict[str, Path]) -> dict:
    scan = scan_dataset(folders["messy"], resolution=64, decode=True, find_duplicates=True)
    return build_report(scan, resolution=64)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdstudio")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_report_has_the_documented_keys(messy_report: dict) -> None:
    assert set(messy_report) == TOP_KEYS
    assert set(messy_report["counts"]) == COUNT_KEYS
    assert set(messy_report["sizes"]) == {
        "bins", "min_shorter_side", "median_shorter_side", "max_shorter_side"}
    assert set(messy_report["aspect_ratios"]) == {"bins"}
    assert set(messy_report["captions"]) == {"sources", "length_bins", "mean_words", "top_tags",
                                              "tag_frequency"}
    assert set(messy_report["buckets"]) == {"resolution", "step", "bins"}
    for row in messy_report["buckets"]["bins"]:
        assert set(row) == {"width", "height", "aspect", "images", "per_epoch"}
    for problem in messy_report["problems"]:
        assert set(problem) == {"kind", "severity", "path", "message", "fix"}
    json.dumps(messy_report)  # JSON-ready as it is


def test_every_key_and_kind_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", doc))
    missing = (TOP_KEYS | COUNT_KEYS | set(PROBLEM_KINDS)) - documented
    assert not missing, f"not in {DOC.name}: {sorted(missing)}"


def test_report_counts_and_histograms(messy_report: dict) -> None:
    counts = messy_report["counts"]
    assert counts["images"] == 13 and counts["captioned"] == 1 and counts["uncaptioned"] == 12
    assert counts["errors"] == 4
    assert counts["errors"] + counts["warnings"] == counts["problems"] == len(messy_report["problems"])
    assert counts["problems_by_kind"]["truncated"] == 1
    assert sum(b["count"] for b in messy_report["sizes"]["bins"]) == 13
    assert sum(b["count"] for b in messy_report["aspect_ratios"]["bins"]) == 13
    assert [b["label"] for b in messy_report["aspect_ratios"]["bins"]] == [
        "<0.5", "0.5-0.75", "0.75-0.9", "0.9-1.1", "1.1-1.33", "1.33-2", ">2"]
    assert messy_report["sizes"]["min_shorter_side"] == 8
    paths = {(p["kind"], p["path"]) for p in messy_report["problems"]}
    assert ("duplicate", "sub/good_copy.png") in paths  # relative to the root, '/'-separated
    assert messy_report["usable"] is True
    assert "13 usable images" in messy_report["summary"] and "\n" not in messy_report["summary"]


def test_report_kohya_concepts_and_tags(folders: dict[str, Path]) -> None:
    report = build_report(scan_dataset(folders["kohya"]))
    assert report["counts"]["repeats_total"] == 32
    assert report["counts"]["concepts"] == [
        {"name": "10_sks dog", "repeats": 10, "images": 3}, {"name": "2_cat", "repeats": 2, "images": 1}]
    assert report["captions"]["top_tags"][0] == ["sks dog", 2]
    assert report["captions"]["tag_frequency"]["cat"] == 1
    assert report["captions"]["sources"] == {"sidecar": 1, "folder": 3}


def test_report_tags_counted_once_per_image(tmp_path: Path) -> None:
    save(noise_image(64, 64, seed=1), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("dog, grass\ndog, sky\n", encoding="utf-8")
    save(noise_image(64, 64, seed=2), tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("dog", encoding="utf-8")
    captions = build_report(scan_dataset(tmp_path))["captions"]
    assert captions["tag_frequency"] == {"dog": 2, "grass": 1, "sky": 1}
    assert captions["mean_words"] == round((2 + 2 + 1) / 3, 2)


def test_empty_folder_report_is_not_usable(tmp_path: Path) -> None:
    report = build_report(scan_dataset(tmp_path))
    assert report["usable"] is False and "nothing to train on" in report["summary"]
    assert "nothing to train on" in format_report(report)


def test_format_report_groups_problems_with_fixes(messy_report: dict) -> None:
    text = format_report(messy_report)
    assert "Layout:  plain" in text
    for kind in ("truncated", "zero_byte", "not_an_image", "decompression_bomb", "duplicate",
                 "near_duplicate", "orphan_caption", "undecodable_caption", "too_small", "extreme_aspect"):
        assert f"  {kind} (" in text
    assert "and 1 more" in text  # 11 missing captions, 10 listed
    assert text.index("Errors") < text.index("Warnings")
    assert messy_report["summary"] in text


def test_cli_check_json_parses(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(folders["messy"])
    args = _parser().parse_args(["dataset", "check", str(folders["messy"]), "--json", "--resolution", "64"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == TOP_KEYS and report["counts"]["images"] == 13
    assert snapshot(folders["messy"]) == before


def test_cli_check_text(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["dataset", "check", str(folders["kohya"])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Layout:  kohya" in out and "32 per epoch" in out


def test_cli_missing_folder_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_check(argparse.Namespace(dir=tmp_path / "nope", json=True, resolution=512))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "nope" in captured.err
    assert "Traceback" not in captured.err


def test_cli_dataset_without_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["dataset"])
    assert args.func(args) == 2
    assert "check" in capsys.readouterr().err


# --- registry --------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_registry_add_list_remove(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "my data"
    data.mkdir()
    (data / "keep.txt").write_text("x", encoding="utf-8")
    assert registry.list_datasets() == []
    entry = registry.add_dataset(data, summary="plain dataset: 0 usable images")
    assert entry.name == "my data" and Path(entry.path) == data.absolute()
    assert registry.registry_path() == home / "data" / "datasets.json"
    again = registry.add_dataset(data, name="renamed")  # no duplicate entry, first 'added' kept
    assert [e.name for e in registry.list_datasets()] == ["renamed"]
    assert again.added == entry.added and again.summary == "plain dataset: 0 usable images"
    assert registry.update_summary(data, "new summary")
    assert registry.list_datasets()[0].summary == "new summary"
    assert not registry.update_summary(tmp_path / "other", "x")
    assert registry.remove_dataset(data)
    assert not registry.remove_dataset(data)
    assert registry.list_datasets() == []
    assert (data / "keep.txt").read_text(encoding="utf-8") == "x"  # never deletes the dataset
    assert [p.name for p in registry.registry_path().parent.iterdir()] == ["datasets.json"]  # no temp left


def test_registry_tolerates_a_corrupt_file(home: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    file = registry.registry_path()
    file.parent.mkdir(parents=True)
    file.write_text("{ not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert registry.list_datasets() == []
    assert "datasets.json" in caplog.text
    assert file.with_name("datasets.json.bad").read_text(encoding="utf-8") == "{ not json"
    registry.add_dataset(tmp_path)
    assert [Path(e.path) for e in registry.list_datasets()] == [tmp_path.absolute()]
    assert json.loads(file.read_text(encoding="utf-8"))["version"] == registry.REGISTRY_VERSION


def test_registry_skips_invalid_entries(home: Path, tmp_path: Path) -> None:
    file = registry.registry_path()
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps({"version": 1, "datasets": [
        {"name": "ok", "path": str(tmp_path), "added": "2024-01-01T00:00:00+00:00"}, {"name": 3}]}),
        encoding="utf-8")
    assert [e.name for e in registry.list_datasets()] == ["ok"]
