"""Export a trained adapter for use elsewhere: merged weights, GGUF (llama.cpp), an Ollama Modelfile.

    python -m flows.export --format merged,gguf,ollama              # outputs/latest, written into the bundle
    python -m flows.export --adapter outputs/<run> --format gguf
    python -m flows.export --adapter you/wednesday-adapter --format ollama --hub-repo you/wednesday-adapter

A local bundle gets merged/, gguf/ and Modelfile beside its adapter. An adapter from the Hub is copied to
--out (default outputs/export-<owner>--<name>) and exported there; --hub-repo adds the outputs to that repo in
one commit. The fine-tune flow does the same at its end when `export_formats` is set (README, "Use it elsewhere").
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from personatune.config import EXPORT_FORMATS
    from personatune.inference import add_adapter_arguments

    p = argparse.ArgumentParser(prog="python -m flows.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(p)
    p.add_argument("--format", required=True, help=f"Comma-separated: {', '.join(EXPORT_FORMATS)} (each includes "
                                                    "what it is built from: ollama -> gguf -> merged).")
    p.add_argument("--out", help="Where to export an adapter that is not a local bundle (default: "
                                 "<outputs>/export-<owner>--<name>).")
    p.add_argument("--hub-repo", help="Add the exported files to this Hub repo (one commit on --hub-revision).")
    p.add_argument("--hub-revision", default=None, help="Branch of --hub-repo to commit to (default: main).")
    return p.parse_args(argv)


def export_folder(args) -> Path:
    """The folder to export into: the local bundle itself, or a copy of an adapter fetched from the Hub."""
    from personatune.inference import locate_adapter

    adapter = locate_adapter(args.adapter, args.revision, args.outputs)
    local = not args.adapter or Path(args.adapter).expanduser().is_dir()
    if local:
        return adapter
    out = Path(args.out or Path(args.outputs) / ("export-" + args.adapter.split("@")[0].replace("/", "--")))
    if not out.is_dir():
        shutil.copytree(adapter, out, ignore=shutil.ignore_patterns(".*"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from personatune.export import export_bundle, parse_formats
    from personatune.hub import HubError

    transformers.utils.logging.disable_progress_bar()
    try:
        parse_formats(args.format)
        bundle = export_folder(args)
        done = export_bundle(bundle, args.format, base_model=args.base_model,
                             log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError, HubError) as e:  # ExportError is a ValueError
        print(f"export: {e}", file=sys.stderr)
        return 2
    for fmt, path in done.items():
        print(f"{fmt}: {path}")
    if args.hub_repo:
        from personatune.hub import push_exports
        from tasks.publish import hub_token

        try:
            pushed = push_exports(bundle, args.hub_repo, hub_token()[0], revision=args.hub_revision)
        except HubError as e:
            print(f"export: {e}", file=sys.stderr)
            return 1
        print(f"hub: {pushed.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
