"""``sparse2dense generate``: generate with any supported model, from text or a video file."""

from __future__ import annotations

import json
import sys

from .common import (UserError, _add_std_args, _fraction, _non_negative, _positive, _positive_float, _progress_bar,
                     _quiet_transformers, _read_text, _std_config)


def add_parser(sub) -> None:
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


def run(args) -> int:
    import torch

    _quiet_transformers()
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k))
    cfg = _std_config(args)
    sampling = _check(args)
    model, tok, input_ids, attention_mask, model_inputs, video = _inputs(args, log)
    progress = _progress_bar(sys.stderr.isatty())
    result: dict = {"model": args.model, "prompt_tokens": int(input_ids.shape[1]), "budget": cfg.budget,
                    "gamma": cfg.gamma, "policy": cfg.policy}
    if args.compare and cfg.speculative:
        from ..timing import compare_methods

        runs = compare_methods(model, input_ids, attention_mask, args.max_new_tokens, cfg, progress=progress,
                               **model_inputs)
        std, dense = runs["std"], runs["dense"]
        seq, stats = std.sequences, std.stats
        identical = bool(torch.equal(std.sequences, dense.sequences))
        result.update(dense_decode_s=round(dense.decode_s, 3), std_decode_s=round(std.decode_s, 3),
                      speedup_decode=round(dense.decode_s / std.decode_s, 3) if std.decode_s else None,
                      identical=identical)
    else:
        seq, stats = _generate(args, cfg, model, tok, input_ids, attention_mask, model_inputs, sampling, progress)
    answer = tok.decode(seq[0, input_ids.shape[1]:], skip_special_tokens=True)
    result.update(answer=answer, stats=stats, do_sample=args.do_sample, **sampling)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _report(args, cfg, result, stats, video is not None)
    return 0 if result.get("identical", True) else 1


def _check(args) -> dict:
    """Option combinations that cannot work; returns the sampling settings given."""
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
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
    return sampling


def _inputs(args, log):
    """Read the context and video, load the model: ``(model, tokenizer, ids, mask, vision inputs, video)``."""
    from ..models import load_model

    context = _read_text(args.context_file, "context file") if args.context_file else ""
    video = None
    if args.video:
        from ..video import read_video

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
        from ..video_inputs import build_video_inputs

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
    return (model, tok, enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device), model_inputs,
            video)


def _generate(args, cfg, model, tok, input_ids, attention_mask, model_inputs, sampling, progress):
    import torch

    from ..generation import generate

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
    return out.sequences, out.stats.to_dict()


def _report(args, cfg, result: dict, stats: dict, video: bool) -> None:
    if args.stream:
        sys.stdout.flush()
    else:
        print(result["answer"].strip())
    print()
    if video:
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
