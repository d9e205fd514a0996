"""``python -m quantkern <command>``: ``demo`` (quantize real models and print the tables)."""
import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m quantkern", epilog="options go after the command: python -m quantkern demo --help lists them")
    sub = ap.add_subparsers(dest="command", metavar="command", required=True)
    sub.add_parser("demo", help="MiniLM + EfficientNet-Lite0 quantization tables (offline); demo --help for options",
                   add_help=False)
    # only the command is parsed here (the rest is the command's own); an option before it has no
    # command to go to (it used to read as "the following arguments are required")
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        ap.error(f"unrecognized arguments: {argv[0]} (options go after the command, e.g. "
                 f"python -m quantkern demo {argv[0]})")
    args = ap.parse_args(argv[:1])
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])


if __name__ == "__main__":
    main()
