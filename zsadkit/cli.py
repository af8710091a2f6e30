"""The `zsadkit` console script: `zsadkit <command> <subcommand> ...`.

    zsadkit data list
    zsadkit data prepare NAME --raw DIR --root DATA_ROOT [--protocol P] [--download] [--counts FILE]
    zsadkit data check --root DATA_ROOT
    zsadkit data from-folder DIR --out manifest.csv [--image-level-only] [--class-name WORD]
    zsadkit predict INPUT... --method NAME --out DIR [--backbone B] [--pretrained TAG_OR_FILE] [--image-size N]
        [--device D] [--batch-size N] [--precision fp32|bf16|fp16] [--checkpoint FILE] [--references DIR_OR_FILES...] [--shots K]
        [--threshold T | --calibrate CAL_DIR [--target-fpr F]] [--maps overlay|raw|both|none] [--class-name WORD]
        [--force]

Each command group registers itself with `add_<group>_commands(subparsers)`; a subcommand sets
`func(args) -> int`. Bad input (`ValueError`, which every `zsadkit.data` error is) prints one clear
message and exits with status 2. `zsadkit predict` exits with status 1 when some inputs could not be read (every
readable image is still scored).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from zsadkit.data.catalog import available_datasets, dataset_status, get_dataset_spec
from zsadkit.data.errors import DataError
from zsadkit.data.from_folder import manifest_from_folder
from zsadkit.data.prepare import prepare_dataset
from zsadkit.models import PretrainedWeightsUnavailableError
from zsadkit.predict import MAP_MODES, predict, resolve_backbone

__all__ = [
    "add_data_commands",
    "add_predict_command",
    "build_parser",
    "main",
]


def _data_list(args: argparse.Namespace) -> int:
    for name in available_datasets():
        spec = get_dataset_spec(name)
        print(f"{name:<14} {spec.title:<44} protocols: {', '.join(spec.protocols)}  [{spec.licence}]")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    expected = None
    if args.counts is not None:
        if not Path(args.counts).is_file():
            raise DataError(f"{args.counts}: --counts file is missing (expected a YAML file of expected counts)")
        try:
            expected = yaml.safe_load(Path(args.counts).read_text())
        except yaml.YAMLError as err:
            raise DataError(f"{args.counts}: --counts file is not valid YAML ({err})") from err
        if not isinstance(expected, dict):
            raise ValueError(f"{args.counts}: expected a mapping protocol -> {{test: {{total, per_class}}}}")
    results = prepare_dataset(
        args.name,
        args.raw,
        args.root,
        args.protocol,
        fetch=args.download,
        force=args.force,
        keep_raw=args.keep_raw,
        expected_counts=expected,
    )
    if all(r.skipped for r in results):
        print(
            f"error: no raw data of {args.name} found; " + "; ".join(dict.fromkeys(r.skipped for r in results)),
            file=sys.stderr,
        )
        return 2
    return 0


def _data_check(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist (expected the --root folder given to prepare)")
    statuses = dataset_status(args.root, args.names or None)
    print(f"{'dataset':<14} {'protocol':<16} {'state':<9} {'test normal / anomalous':<24} note")
    for status in statuses:
        state = "ready" if status.ready else "missing"
        counts = ""
        if status.test_counts:
            normal = sum(c[0] for c in status.test_counts.values())
            anomalous = sum(c[1] for c in status.test_counts.values())
            published = {True: "", False: " (!)", None: " (unpublished)"}[status.matches_published]
            counts = f"{normal} / {anomalous}{published}"
        print(f"{status.dataset:<14} {status.protocol:<16} {state:<9} {counts:<24} {status.detail}")
    ready = sum(s.ready for s in statuses)
    print(f"{ready} of {len(statuses)} dataset protocols ready under {root}")
    return 0


def _data_from_folder(args: argparse.Namespace) -> int:
    samples = manifest_from_folder(
        args.folder,
        args.out,
        root=args.root,
        class_name=args.class_name,
        dataset=args.dataset,
        image_level_only=args.image_level_only,
    )
    normal = sum(s.label == 0 for s in samples)
    masked = sum(s.mask is not None for s in samples)
    kind = "reference set (good/ only)" if normal == len(samples) else f"{masked} with masks"
    print(
        f"{args.out}: {normal} normal, {len(samples) - normal} anomalous ({kind}), class word "
        f"{samples[0].class_name!r} in prompts; paths relative to {Path(args.root or args.folder).expanduser().resolve()}"
    )
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `zsadkit data ...`."""
    data = subparsers.add_parser("data", help="benchmark datasets: prepare, check, list, from-folder")
    commands = data.add_subparsers(dest="data_command", required=True)

    listing = commands.add_parser("list", help="datasets with a manifest and their protocols")
    listing.set_defaults(func=_data_list)

    prepare = commands.add_parser(
        "prepare", help="verify, extract and convert a dataset; write its manifests"
    )
    prepare.add_argument("name", help="dataset name (see `zsadkit data list`)")
    prepare.add_argument(
        "--raw", required=True, help="folder holding the downloaded archives (or extracted data)"
    )
    prepare.add_argument("--root", required=True, help="data root; output goes to ROOT/NAME/")
    prepare.add_argument(
        "--protocol", help="one protocol (default: every protocol whose raw data is present)"
    )
    prepare.add_argument(
        "--download",
        action="store_true",
        help="download missing archives that have a stable public link (resumable, verified)",
    )
    prepare.add_argument("--force", action="store_true", help="rebuild the canonical copy even if it exists")
    prepare.add_argument(
        "--keep-raw", action="store_true", help="keep the extracted archives in ROOT/NAME/.staging"
    )
    prepare.add_argument(
        "--counts",
        help="YAML file of expected counts replacing the published ones: "
        "{protocol: {test: {total: [n, a], per_class: {cls: [n, a]}}}}",
    )
    prepare.set_defaults(func=_data_prepare)

    check = commands.add_parser("check", help="which datasets are ready under a data root, with counts")
    check.add_argument("--root", required=True, help="the data root")
    check.add_argument("names", nargs="*", help="datasets to check (default: all)")
    check.set_defaults(func=_data_check)

    from_folder = commands.add_parser(
        "from-folder", help="a manifest from good/, bad/ and optional masks/ folders (good/ alone: a reference set)"
    )
    from_folder.add_argument("folder", help="folder holding good/ and bad/ (and optionally masks/), or good/ only")
    from_folder.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl)")
    from_folder.add_argument("--root", help="paths are written relative to this folder (default: FOLDER)")
    from_folder.add_argument(
        "--class-name", help="class word of every record, used in the prompts (default: the folder name)"
    )
    from_folder.add_argument("--dataset", help="dataset name of every record (default: the folder name)")
    from_folder.add_argument(
        "--image-level-only",
        action="store_true",
        help="write no masks even if FOLDER/masks/ exists (otherwise every anomalous image needs one)",
    )
    from_folder.set_defaults(func=_data_from_folder)


def _predict(args: argparse.Namespace) -> int:
    backbone, pretrained, image_size = resolve_backbone(args.method, args.backbone, args.pretrained, args.image_size)
    weights = f"weights {pretrained}" if pretrained else "RANDOM weights"
    print(f"zsadkit predict: method {args.method}, backbone {backbone} ({weights}), image size {image_size}, "
          f"device {args.device}")
    try:
        result = predict(
            args.inputs, method=args.method, out=args.out, backbone=backbone, pretrained=pretrained,
            image_size=image_size, device=args.device, batch_size=args.batch_size, checkpoint=args.checkpoint or "",
            references=args.references, shots=args.shots, threshold=args.threshold, calibrate=args.calibrate,
            target_fpr=args.target_fpr, maps=args.maps, class_name=args.class_name, force=args.force, precision=args.precision,
        )
    except (OSError, PretrainedWeightsUnavailableError) as err:  # a missing weights file, no network for weights
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    written = ", ".join(name for name in ("scores.csv", "maps/", "errors.csv", "calibration.json", "run.json")
                        if (result.out / name).exists())
    print(f"wrote {written} in {result.out}")
    if len(result.errors):
        print(f"error: {len(result.errors)} of {len(result.errors) + len(result.scores)} input image(s) could not be "
              f"read; see {result.out / 'errors.csv'}", file=sys.stderr)
        return 1
    return 0


def add_predict_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `zsadkit predict ...`."""
    command = subparsers.add_parser(
        "predict", help="anomaly scores, maps and a decision on your own images, with any registered method",
        description="Score images with a registered method; write DIR/scores.csv, DIR/maps/ and DIR/run.json. "
        "A rerun into the same DIR scores only the images not yet in scores.csv.",
    )
    command.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders (searched recursively), glob patterns, or a manifest .csv/.jsonl")
    command.add_argument("--method", required=True, metavar="NAME", help="a registered method: clip, clip-ac, winclip, vand, ...")
    command.add_argument("--out", required=True, metavar="DIR", help="output folder")
    command.add_argument("--backbone", metavar="B",
                         help="open_clip model name, or zsad-tiny (random weights, offline) (default: the method's paper "
                         "backbone: ViT-L-14-336; ViT-B-16-plus-240 for winclip and inctrl)")
    command.add_argument("--pretrained", metavar="TAG_OR_FILE", help="open_clip tag or a local weights file (default: the "
                         "method's paper weights, openai or laion400m_e31/e32; openai for another backbone; none for zsad-tiny)")
    command.add_argument("--image-size", type=int, metavar="N", help="input side in pixels (default: the method's paper "
                         "size, 518 or 240; 518 for another backbone; 112 for zsad-tiny)")
    command.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cuda (default: cpu)")
    command.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")
    command.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                         help="image tower precision (autocast); bf16 on a GPU or a CPU with bf16 (default: fp32)")
    command.add_argument("--checkpoint", metavar="FILE", help="the method's trained prompts, projections, adapters or heads "
                         "(zsadkit's files or the official ones)")
    command.add_argument("--references", nargs="+", metavar="DIR_OR_FILES",
                         help="normal reference images of few-shot methods (WinCLIP+, VAND few-shot, InCTRL, ...)")
    command.add_argument("--shots", type=int, metavar="K", help="draw K references per class (default: all)")
    threshold = command.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, metavar="T", help="decision threshold: anomalous when score > T")
    threshold.add_argument("--calibrate", metavar="CAL_DIR",
                           help="pick the threshold on CAL_DIR/good and CAL_DIR/bad (F1-max, or --target-fpr)")
    command.add_argument("--target-fpr", type=float, metavar="F",
                         help="with --calibrate: the lowest threshold whose false-positive rate on good/ is <= F")
    command.add_argument("--maps", choices=MAP_MODES, default="both",
                         help="PNG overlays, raw float16 .npy maps, both or none (default: both)")
    command.add_argument("--class-name", metavar="WORD", help="the class word in the prompts (default: each input "
                         "folder's name, a manifest's class_name, 'object' for files)")
    command.add_argument("--force", action="store_true", help="start DIR afresh (needed when a previous run there had other settings)")
    command.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    """The `zsadkit` argument parser with every command group."""
    parser = argparse.ArgumentParser(prog="zsadkit", description="CLIP zero-shot anomaly detection kit")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_data_commands(subparsers)
    add_predict_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `zsadkit` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
