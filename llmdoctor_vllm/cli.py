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
    demo = sub.add_parser("demo", help="build a tiny patient and doctor here and show plain vs guided outputs",
                          description="Builds a tiny patient and doctor locally (no download) and prints plain vs "
                                      "guided completions from a real vLLM engine.")
    demo.add_argument("--workdir", help="where to save the tiny models (default: a new temp dir)")
    demo.add_argument("--beta", type=float, default=1.0, help="doctor weight (default 1.0)")
    demo.add_argument("--max-tokens", type=int, default=24, help="tokens per completion (default 24)")
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

        run_demo(args.workdir, beta=args.beta, max_tokens=args.max_tokens)
    elif args.command == "rewards":
        from train.rewards_cli import run_rewards

        run_rewards(args)
    elif args.command == "train":
        from train.train_cli import run_train

        run_train(args)


if __name__ == "__main__":
    main()
