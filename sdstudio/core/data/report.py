"""The dataset health report: a JSON-ready dict with stable keys (docs/dataset-report.md), and its text."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from sdstudio.core.data.buckets import DEFAULT_STEP, format_bucket_stats, plan_buckets
from sdstudio.core.data.mask_files import mask_path
from sdstudio.core.data.problems import KIND_ORDER, ProblemList
from sdstudio.core.data.scan import ImageRecord, ScanResult
from sdstudio.core.data.training_masks import mask_problems

REPORT_VERSION = 1
TOP_TAGS = 50
PROBLEM_FILES_SHOWN = 10

# (label, low inclusive, high exclusive or None)
SIZE_BINS: list[tuple[str, float, float | None]] = [
    ("<256", 0, 256), ("256-511", 256, 512), ("512-767", 512, 768), ("768-1023", 768, 1024),
    ("1024-1535", 1024, 1536), ("1536-2047", 1536, 2048), (">=2048", 2048, None),
]
ASPECT_BINS: list[tuple[str, float, float | None]] = [
    ("<0.5", 0, 0.5), ("0.5-0.75", 0.5, 0.75), ("0.75-0.9", 0.75, 0.9), ("0.9-1.1", 0.9, 1.1),
    ("1.1-1.33", 1.1, 1.33), ("1.33-2", 1.33, 2.0), (">2", 2.0, None),
]
WORD_BINS: list[tuple[str, float, float | None]] = [
    ("0", 0, 1), ("1-5", 1, 6), ("6-15", 6, 16), ("16-30", 16, 31), ("31-50", 31, 51), ("51-75", 51, 76),
    (">75", 76, None),
]
_OWN_CAPTION = ("sidecar", "metadata")
_LAYOUT_TEXT = {
    "plain": "a folder of images",
    "kohya": "kohya parent folder: each <repeats>_<name> subfolder is a concept",
    "imagefolder": "Hugging Face imagefolder (metadata.jsonl / metadata.csv)",
}


def _histogram(values: list[float], bins: list[tuple[str, float, float | None]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"label": label, "min": low, "max": high, "count": 0}
                                 for label, low, high in bins]
    for value in values:
        for row, (_label, low, high) in zip(out, bins, strict=True):
            if value >= low and (high is None or value < high):
                row["count"] += 1
                break
    return out


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def _caption_stats(records: list[ImageRecord]) -> dict[str, Any]:
    lengths = [len(c.split()) for r in records for c in (r.captions or ("",))]
    frequency: Counter[str] = Counter()
    for record in records:
        # Once per image, however many alternative captions mention the tag.
        frequency.update({tag for caption in record.captions for tag in _tags(caption)})
    ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
    return {
        "sources": dict(Counter(r.caption_source for r in records)),
        "length_bins": _histogram([float(n) for n in lengths], WORD_BINS),
        "mean_words": round(statistics.fmean(lengths), 2) if lengths else 0.0,
        "top_tags": [[tag, count] for tag, count in ranked[:TOP_TAGS]],
        "tag_frequency": dict(ranked),
    }


def _buckets(records: list[ImageRecord], resolution: int) -> dict[str, Any]:
    """Where aspect-ratio bucketing at this resolution would put the images (none when resolution is 0)."""
    if resolution <= 0 or not records:
        return {"resolution": resolution, "step": 0, "bins": []}
    plan = plan_buckets(records, resolution, step=DEFAULT_STEP)
    return {"resolution": resolution, "step": plan.step, "bins": plan.stats(records)}


def _rel(scan: ScanResult, path: Any) -> str:
    try:
        return path.relative_to(scan.root).as_posix() or "."
    except ValueError:
        return str(path)


def build_report(scan: ScanResult, resolution: int = 0, *, masked: bool = False,
                 mask_from_alpha: bool = False) -> dict[str, Any]:
    """The health report of a scan: counts, histograms, captions and problems (keys documented).

    Masks of another size than their image are always reported; with ``masked`` (masked training,
    loss.masked) images without a mask are too; ``mask_from_alpha``: an alpha channel counts as a mask."""
    records = scan.records
    found = ProblemList(scan.root)
    for kind, path, message, fix in mask_problems(records, masked=masked, from_alpha=mask_from_alpha):
        found.add(kind, path, message, fix)
    problems = sorted([*scan.problems, *found], key=lambda p: (KIND_ORDER[p.kind], p.path))
    errors = sum(p.severity == "error" for p in problems)
    per_concept = Counter(r.concept for r in records)
    concepts = [{"name": name, "repeats": repeats, "images": per_concept.get(name, 0)}
                for name, repeats in sorted(scan.concepts.items())]
    shorter = [min(r.width, r.height) for r in records]
    captioned = sum(r.caption_source in _OWN_CAPTION for r in records)
    with_masks = [_rel(scan, r.path) for r in records if mask_path(r.path).is_file()]
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "root": str(scan.root),
        "layout": scan.layout,
        "resolution": resolution,
        "counts": {
            "images": len(records),
            "captioned": captioned,
            "uncaptioned": len(records) - captioned,
            "masked": len(with_masks),
            "problems": len(problems),
            "errors": errors,
            "warnings": len(problems) - errors,
            "repeats_total": scan.images_per_epoch,
            "concepts": concepts,
            "problems_by_kind": dict(sorted(Counter(p.kind for p in problems).items())),
        },
        "sizes": {
            "bins": _histogram([float(s) for s in shorter], SIZE_BINS),
            "min_shorter_side": min(shorter, default=0),
            "median_shorter_side": int(statistics.median(shorter)) if shorter else 0,
            "max_shorter_side": max(shorter, default=0),
        },
        "aspect_ratios": {
            "bins": _histogram([r.width / r.height for r in records if r.height], ASPECT_BINS),
        },
        "captions": _caption_stats(records),
        # images with a name.mask.png beside them; masks missing (masked training) / of the wrong size
        "masks": {"images": with_masks, "missing": [_rel(scan, p.path) for p in found if p.kind == "missing_mask"],
                  "wrong_size": [_rel(scan, p.path) for p in found if p.kind == "mask_size"]},
        "buckets": _buckets(records, resolution),
        "problems": [
            {"kind": p.kind, "severity": p.severity, "path": _rel(scan, p.path), "message": p.message,
             "fix": p.fix}
            for p in problems
        ],
        "usable": bool(records),
    }
    report["summary"] = _summary(report)
    return report


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(report: dict[str, Any]) -> str:
    counts = report["counts"]
    text = f"{report['layout']} dataset: {_plural(counts['images'], 'usable image')}"
    if counts["repeats_total"] != counts["images"]:
        text += f" ({counts['repeats_total']} per epoch with repeats)"
    if counts["concepts"]:
        text += f" in {_plural(len(counts['concepts']), 'concept')}"
    text += f"; {_plural(counts['errors'], 'error')}, {_plural(counts['warnings'], 'warning')}"
    if not report["usable"]:
        text += "; nothing to train on"
    return text + "."


def _bars(title: str, bins: list[dict[str, Any]], width: int = 30) -> list[str]:
    peak = max((b["count"] for b in bins), default=0)
    label_width = max(len(b["label"]) for b in bins)
    lines = [title]
    for b in bins:
        bar = "#" * (round(width * b["count"] / peak) if peak else 0)
        if b["count"] and not bar:
            bar = "#"
        lines.append(f"  {b['label']:>{label_width}} | {bar} {b['count']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """A readable multi-line summary of a build_report() dict."""
    counts = report["counts"]
    lines = [
        f"Dataset: {report['root']}",
        f"Layout:  {report['layout']} ({_LAYOUT_TEXT.get(report['layout'], report['layout'])})",
        (f"Images:  {counts['images']} usable, {counts['repeats_total']} per epoch; "
         f"{counts['captioned']} with their own caption, {counts['uncaptioned']} without"),
    ]
    if counts.get("masked"):
        lines.append(f"Masks:   {counts['masked']} of {counts['images']} images have a training mask "
                     "(name.mask.png)")
    for concept in counts["concepts"]:
        lines.append(f"  concept {concept['name']!r}: {concept['repeats']} repeats x "
                     f"{_plural(concept['images'], 'image')}")
    lines.append(f"Problems: {_plural(counts['errors'], 'error')} (files not used), "
                 f"{_plural(counts['warnings'], 'warning')}")
    if counts["images"]:
        sizes = report["sizes"]
        lines += [""] + _bars(f"Shorter side (px; min {sizes['min_shorter_side']}, median "
                              f"{sizes['median_shorter_side']}, max {sizes['max_shorter_side']})",
                              sizes["bins"])
        lines += [""] + _bars("Aspect ratio (width / height)", report["aspect_ratios"]["bins"])
        captions = report["captions"]
        lines += [""] + _bars(f"Caption length (words; mean {captions['mean_words']})",
                              captions["length_bins"])
        if captions["top_tags"]:
            shown = ", ".join(f"{tag} ({n})" for tag, n in captions["top_tags"][:15])
            lines += ["", f"Top tags: {shown}"]
        buckets = report.get("buckets") or {}
        if buckets.get("bins"):
            lines += ["", f"Buckets (with data.bucketing at {buckets['resolution']} px, step {buckets['step']}):"]
            lines += format_bucket_stats(buckets["bins"])
    for severity, heading in (("error", "Errors (these files are not used)"), ("warning", "Warnings")):
        problems = [p for p in report["problems"] if p["severity"] == severity]
        if not problems:
            continue
        lines += ["", heading]
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for p in problems:
            by_kind.setdefault(p["kind"], []).append(p)
        for kind, group in by_kind.items():
            fixes = list(dict.fromkeys(p["fix"] for p in group))
            lines.append(f"  {kind} ({len(group)}): {' / '.join(fixes)}")
            lines += [f"    - {p['message']}" for p in group[:PROBLEM_FILES_SHOWN]]
            if len(group) > PROBLEM_FILES_SHOWN:
                lines.append(f"    ... and {len(group) - PROBLEM_FILES_SHOWN} more (see --json)")
    lines += ["", report["summary"]]
    return "\n".join(lines)
