"""The ``pancls`` command line: parse, dispatch, and turn a :class:`UserError` into one line + exit 2.

Each subcommand lives in ``pancls/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them. A subcommand's ``--help`` shows its module docstring, which is
therefore written for users (what it does, the typical command), as :data:`DESCRIPTION` and :data:`EPILOG` are.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from pancls import __version__
from pancls.errors import UserError
from pancls.io import signals_unwind

#: subcommand -> (module, one-line help), in the order of a project: data, check, train, use
COMMANDS = {
    "synth": ("pancls.commands.synth", "write the synthetic pancreatic-tumour CT cohort, to try everything without hospital data"),
    "ingest": ("pancls.commands.ingest", "convert DICOM/NIfTI studies (+ a label sheet, masks) into checked NIfTI + a manifest"),
    "check": ("pancls.commands.check", "check a dataset manifest as `pancls cv` will (all problems at once) + class counts"),
    "cv": ("pancls.commands.cv", "patient-grouped k-fold cross-validation of the 3D CT classifier, with a report"),
    "report": ("pancls.commands.report", "regenerate the summary, report and model card of a cv run folder"),
    "predict": ("pancls.commands.predict", "predict the subtype of new CT studies with a cv run's fold ensemble"),
    "export": ("pancls.commands.export", "export a cv run folder as a MONAI bundle (TorchScript ensemble + configs)"),
    "export-nnunet": ("pancls.commands.export_nnunet",
                      "write a dataset as an nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr, splits_final.json)"),
    "lt": ("pancls.commands.lt", "train and evaluate a head/loss on long-tailed CIFAR-10/100 (the tSP benchmarks)"),
}

DESCRIPTION = """\
pancls classifies pancreatic tumour subtypes (PDAC, IPMN, NET, SCN, ASC, CP) from abdominal CT with the tSP
classifier (a 3D ResNet with a t-distributed spherical head), and checks that head on the long-tailed CIFAR
benchmarks it was published on."""

EPILOG = """\
typical use:
  pancls synth --out runs/synth --scale 0.1                    a small synthetic cohort to try things on
  pancls ingest /data/export --out dataset --labels labels.csv --masks masks/
  pancls check dataset/manifest.csv                            exit 0: ready for cv
  pancls cv --manifest dataset/manifest.csv --out runs/cv      4 folds + report.html
  pancls predict --model runs/cv study1/ ct.nii.gz --out predictions.csv
  pancls lt --config configs/lt_demo_cpu.yaml --data cifar10.npz --out runs/lt

`pancls COMMAND --help` describes a command. A mistake in the input (a file, an argument, a config value) is
one line on stderr and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an unknown option (--epoch) is an error, not silently the one it prefixes (--epochs)
    parser = argparse.ArgumentParser(prog="pancls", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pancls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(), allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        for action in p._actions:  # every --set (lt, cv) gets the KEY=VALUE check, whoever defines it
            if "--set" in action.option_strings and action.type is None:
                action.type = override
        p.set_defaults(_module=module)
    return parser


def override(text: str) -> str:
    """The argument of ``--set``: ``KEY=VALUE`` as one word. ``--set train.lr 0.05`` (a space instead of
    ``=``) would otherwise end as "unrecognized arguments: 0.05"; the error names the form to type instead."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE as one word, got {text!r}: write --set {text}=VALUE "
                                         "(no space around '=')")
    if not value:
        raise argparse.ArgumentTypeError(f"nothing after '=' in {text!r}: write --set {key}=VALUE as one word (no "
                                         f"space after '='; --set {key}=null sets it to null)")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals_unwind():
            return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"pancls {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pancls {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
