"""``llmdoctor``: the command line (demo, Stage 1 rewards, Stage 2 training); also ``python -m llmdoctor_train.cli``."""

from __future__ import annotations

import argparse

from llmdoctor_train.stage1 import cli as rewards_cli
from llmdoctor_train.stage2 import cli as train_cli


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the whole loop on a toy task: patient, rewards, TFPO doctor, guided decoding",
                          description="Trains a tiny instruction-following patient here (no download), samples "
                                      "preference pairs, extracts Stage 1 token rewards in vLLM, trains a TFPO doctor, "
                                      "and prints plain vs guided replies with their task reward. A few minutes on CPU.")
    demo.add_argument("--workdir", help="where to save the models and data (default: a new temp dir)")
    demo.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0], help="doctor weights to show (1 2)")
    demo.add_argument("--rule", choices=["product", "delta"], nargs="+", default=["product", "delta"],
                      help="decoding rules to show (product delta)")
    demo.add_argument("--train-steps", type=int, default=300, help="TFPO steps (300)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmdoctor",
        description="Test-time alignment of a frozen LLM served by vLLM with a small doctor model.",
        epilog="Serving: vllm serve PATIENT --additional-config '{\"llmdoctor\": {\"doctors\": {\"helpful\": PATH}}}' "
               "and send vllm_xargs={\"llmdoctor_beta\": 0.8} per request.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    for name, module in (("rewards", rewards_cli), ("train", train_cli)):
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, epilog=module.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv=None) -> None:
    """Runs ``llmdoctor ARGV...`` (returns None: the console script exits with its return value)."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from llmdoctor_train.toy.demo import run_demo

        run_demo(args.workdir, betas=args.beta, train_steps=args.train_steps, rules=args.rule)
    elif args.command == "rewards":
        rewards_cli.run_rewards(args)
    else:
        train_cli.run_train(args)


if __name__ == "__main__":
    main()
