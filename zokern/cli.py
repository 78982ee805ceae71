"""The zokern command line: `zokern info`, `zokern demo`."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

import zokern
from zokern import backends, library


def info() -> int:
    print(f"zokern {zokern.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = ["cpu"] + ([f"cuda ({torch.cuda.get_device_name()})"] if torch.cuda.is_available() else [])
    print("devices: " + ", ".join(devices))
    print(f"ops: {', '.join('zokern::' + name for name in library.SCHEMAS)}  (on every available backend)")
    print("backends:")
    for device_type, names in backends.SUPPORTED.items():
        chosen = backends.resolve(None, device_type) if backends.availability("reference", device_type)[0] else None
        for name in names:
            ok, why = backends.availability(name, device_type)
            mark = "yes" if ok else "no "
            default = "  [default]" if name == chosen else ""
            print(f"  {device_type:<5} {name:<10} {mark}  {why}{default}")
    return 0


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="zokern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends and ops are available here (and why not)")
    demo = sub.add_parser("demo", help="a small end-to-end MeZO run on the fused ops (CPU, seconds)")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--lr", type=float, default=2e-2)
    demo.add_argument("--eps", type=float, default=1e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=backends.BACKENDS, default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    from zokern.demo import run_demo

    result = run_demo(steps=args.steps, lr=args.lr, eps=args.eps, seed=args.seed, backend=args.backend)
    return 0 if result["final_accuracy"] > result["initial_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
