"""``llmdoctor``: the command line (demo, Stage 1 rewards, Stage 2 training)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmdoctor",
        description="Test-time alignment of a frozen LLM served by vLLM with a small doctor model.",
        epilog="Serving: vllm serve PATIENT --additional-config '{\"llmdoctor\": {\"doctors\": {\"helpful\": PATH}}}' "
               "and send vllm_xargs={\"llmdoctor_beta\": 0.8} per request.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole loop on a toy task: patient, rewards, TFPO doctor, guided decoding",
                          description="Trains a tiny instruction-following patient here (no download), samples "
                                      "preference pairs, extracts Stage 1 token rewards in vLLM, trains a TFPO doctor, "
                                      "and prints plain vs guided replies with their task reward. A few minutes on CPU.")
    demo.add_argument("--workdir", help="where to save the models and data (default: a new temp dir)")
    demo.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0], help="doctor weights to show (1 2)")
    demo.add_argument("--rule", choices=["product", "delta"], nargs="+", default=["product", "delta"],
                      help="decoding rules to show (product delta)")
    demo.add_argument("--train-steps", type=int, default=300, help="TFPO steps (300)")
    try:
        from train.rewards_cli import add_rewards_parser

        add_rewards_parser(sub)
    except ImportError:
        pass
    try:
        from train.train_cli import add_train_parser

        add_train_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from llmdoctor_vllm.demo import run_demo

        run_demo(args.workdir, betas=args.beta, train_steps=args.train_steps, rules=args.rule)
    elif args.command == "rewards":
        from train.rewards_cli import run_rewards

        run_rewards(args)
    elif args.command == "train":
        from train.train_cli import run_train

        run_train(args)


if __name__ == "__main__":
    main()
