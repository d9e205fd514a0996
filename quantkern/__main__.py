"""``python -m quantkern <command>``: ``demo`` (quantize real models and print the tables)."""
import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m quantkern")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="MiniLM + EfficientNet-Lite0 quantization tables (offline); demo --help for options",
                   add_help=False)
    args, rest = ap.parse_known_args(argv[:1])
    if args.cmd == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])


if __name__ == "__main__":
    main()
