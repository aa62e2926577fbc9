"""``inference_example.py`` / ``colossal-llama-generate``: generate from a prompt, or chat in a terminal REPL.

``--input_txt`` is a path or a literal prompt: when it names an existing file, every non-blank line of that
file is one prompt; otherwise the value itself is the prompt. Prompts run ``--batch_size`` at a time (default 1:
each reply streamed as it is generated); ``--output F.jsonl`` writes ``{"prompt", "response"}`` rows instead of
printing them, ``--chunk_prompts`` prompts at a time (a resumable job, :mod:`.reply_file`), published when every
prompt is done. Under ``torchrun`` / ``colossalai run`` the batches are dealt out over the processes (each on its
own GPUs, :mod:`.placement`) and rank 0 writes (or prints) every reply, in the prompts' order: greedy replies are
those of one process.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from colossal_llama.utils.cli import OneLineErrorParser, add_flags, config_from, flag_fields, str2bool
from colossal_llama.utils.errors import UserInputError, cli_entry
from colossal_llama.utils.ranks import Ranks



@dataclass
class InferenceArgs:
    model_path: str
    tokenizer_path: Optional[str]
    device: str
    max_gpu_memory: Optional[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    input_txt: Optional[str]
    prompt_style: str
    chat: bool
    batch_size: int
    chunk_prompts: int
    output: Optional[str]
    overwrite: bool
    system_message: Optional[str]
    chat_template: Optional[str]
    max_context: Optional[int]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model to load and where: ``--model_path``, ``--tokenizer_path``, ``--device``, ``--max_gpu_memory``
    (every command that runs a model: generation, chat, web chat, evaluation)."""
    p.add_argument("--model_path", required=True, help="HF model folder (e.g. a training save's modeling/)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer folder (default: --model_path)")
    add_placement_args(p)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--max_gpu_memory`` (see :mod:`colossal_llama.inference.placement`)."""
    from colossal_llama.inference.placement import DEVICE_FORMS, FREE_MEMORY_SHARE, parse_device, parse_memory_size

    p.add_argument("--device", default="auto", type=parse_device, metavar="DEVICE",
                   help=f"{DEVICE_FORMS}; auto = cuda if available, else cpu. auto and cuda: the process's GPUs "
                        "(all of them for one process), filled in order: a model larger than one GPU spreads")
    p.add_argument("--max_gpu_memory", default=None, type=parse_memory_size, metavar="SIZE",
                   help=f"weights per GPU at most, e.g. 70GiB "
                        f"(default: {FREE_MEMORY_SHARE * 100:.0f}%% of its free memory)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that chats with a model (terminal and web): model, sampling, template."""
    from colossal_llama.inference.prompting import TEMPLATE_NAMES

    from colossal_llama.inference.generation import SamplingConfig

    add_model_args(p)
    add_flags(p, SamplingConfig)
    p.add_argument("--system_message", default=None, help="system message for the chat template")
    p.add_argument("--chat_template", default=None, choices=TEMPLATE_NAMES,
                   help="template when the model folder has no colossal_llama_chat.json")
    p.add_argument("--max_context", type=int, default=None,
                   help="chat history budget in tokens (default: the model's max_position_embeddings)")


def sampling_from_args(args):
    """The validated ``SamplingConfig`` of :func:`add_generation_args`' flags."""
    from colossal_llama.inference.generation import SamplingConfig

    return config_from(args, SamplingConfig).validate()


def build_parser() -> argparse.ArgumentParser:
    from colossal_llama.inference.prompting import PROMPT_STYLES

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--input_txt", default=None, help="a prompt, or a file with one prompt per line")
    p.add_argument("--prompt_style", default="sft", choices=PROMPT_STYLES,
                   help="sft = wrap in the model's chat template; pretrained = raw text continuation")
    p.add_argument("--chat", type=str2bool, nargs="?", const=True, default=False,
                   help="interactive multi-turn chat on stdin (an empty line or EOF ends it)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="prompts generated at once (left-padded); 1 streams each reply as it is generated")
    p.add_argument("--chunk_prompts", type=int, default=4096,
                   help="prompts of --input_txt read, generated and written at a time (with --output or under a "
                        "launcher): memory does not grow with the file")
    p.add_argument("--output", default=None, help="write the replies to this jsonl ({prompt, response} rows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def parse_args(argv: Optional[List[str]] = None) -> InferenceArgs:
    return InferenceArgs(**vars(build_parser().parse_args(argv)))


def check_batch_args(args: InferenceArgs) -> None:
    """``--batch_size`` and ``--output`` before the model loads: a reply file is never overwritten unasked."""
    for name in ("batch_size", "chunk_prompts"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.chat and (args.output is not None or args.batch_size != 1):
        raise UserInputError("--output and --batch_size are for --input_txt prompts, not --chat")
    if args.output is not None and Path(args.output).exists() and not args.overwrite:
        raise UserInputError(f"--output {args.output}: already exists (pass --overwrite to replace it)")


def prompt_ids_of(args: InferenceArgs, tokenizer, sampling):
    """``prompt -> token ids`` for ``--prompt_style``; with ``sft`` also adds the template's stop ids to
    ``sampling``."""
    from colossal_llama.inference.prompting import pretrained_prompt_ids, resolve_chat_template, sft_prompt_ids

    if args.prompt_style != "sft":
        return lambda prompt: pretrained_prompt_ids(tokenizer, prompt)
    template = resolve_chat_template(args.model_path, tokenizer, args.chat_template, args.system_message)
    sampling.stop_token_ids = list(template.stop_token_ids)
    return lambda prompt: sft_prompt_ids(template, prompt)


def check_prompt_lengths(args: InferenceArgs, tokenizer, sampling, prompts) -> None:
    """Before the model loads: every prompt and its ``--max_new_tokens`` fit in the model's positions (its
    ``config.json``). Past them a model still generates, but garbage, for hours over a large file."""
    from colossal_llama.inference.loading import configured_context_length

    positions = configured_context_length(args.model_path)
    if positions is None:
        return
    encode = prompt_ids_of(args, tokenizer, sampling)
    for where, prompt in prompts.located():
        if (length := len(encode(prompt))) + sampling.max_new_tokens > positions:
            raise UserInputError(f"{where}: the prompt is {length} tokens; with --max_new_tokens "
                                 f"{sampling.max_new_tokens} that is more than the model's {positions} positions "
                                 "(shorten it or lower --max_new_tokens)")


def run_prompts(args: InferenceArgs, model, tokenizer, sampling, prompts, ranks: Ranks = Ranks(), out=None) -> None:
    """Generate for every prompt (:class:`.reply_file.Prompts`): each reply printed to ``out`` (default stdout) as
    its batch finishes (streamed when ``--batch_size`` is 1), or, with ``--output`` or under a launcher, as a job a
    chunk at a time (rank 0 writes or prints; :mod:`.reply_file`)."""
    from colossal_llama.inference.generation import decode_reply, generate_batch, generate_stream

    out = out or sys.stdout
    encode = prompt_ids_of(args, tokenizer, sampling)
    if args.output is not None or ranks.size > 1:
        return run_reply_job(args, model, tokenizer, sampling, prompts, encode, ranks, out)
    for _, batch in prompts.chunks(args.batch_size):
        if len(batch) == 1:
            print(f">>> {batch[0]}", file=out, flush=True)
            for piece in generate_stream(model, tokenizer, encode(batch[0]), sampling):
                print(piece, end="", file=out, flush=True)
            print(file=out, flush=True)
            continue
        for prompt, ids in zip(batch, generate_batch(model, tokenizer, [encode(p) for p in batch], sampling)):
            print(f">>> {prompt}\n{decode_reply(tokenizer, ids)}", file=out, flush=True)


def job_settings(args: InferenceArgs, sampling) -> dict:
    """What decides a reply file's replies, besides the prompts: recorded with an unfinished job and checked on
    resuming it (:func:`.reply_file.check_settings`). Keys are flag names. ``--batch_size`` is not among them:
    greedy replies do not depend on it."""
    settings = {"model_path": str(Path(args.model_path).resolve()),
                "tokenizer_path": str(Path(args.tokenizer_path).resolve()) if args.tokenizer_path else None,
                "prompt_style": args.prompt_style, "chat_template": args.chat_template,
                "system_message": args.system_message}
    settings.update((f.name, getattr(sampling, f.name)) for f in flag_fields(type(sampling)))  # the sampling flags
    return settings


def run_reply_job(args: InferenceArgs, model, tokenizer, sampling, prompts, encode, ranks: Ranks, out) -> None:
    """Replies to every prompt over ``ranks``: to ``--output`` (resumed from the progress of an interrupted run),
    else printed by rank 0 as one process prints them; then a summary line."""
    from colossal_llama.inference import reply_file

    target = Path(args.output) if args.output is not None else None
    resumed = (reply_file.prepare(target, prompts, args.overwrite, ranks, job_settings(args, sampling))
               if target is not None else None)
    writer = reply_file.PartialWriter(target) if target is not None and ranks.is_main else None

    def print_rows(rows):
        for prompt, reply in rows:
            print(f">>> {prompt}\n{reply}", file=out, flush=True)

    stats = reply_file.run_job(model, tokenizer, sampling, prompts, encode, args.batch_size, args.chunk_prompts,
                               ranks, writer or print_rows, resumed,
                               reply_file.progress_file(target, ranks) if target is not None else None)
    if not ranks.is_main:
        return
    summary = (f"{stats.replies} replies ({stats.new_tokens} new tokens, "
               f"{stats.new_tokens / max(stats.seconds, 1e-9):,.1f} tokens/s, batches of {args.batch_size}"
               + (f", {ranks.size} processes (batches {', '.join(map(str, stats.batches_per_process))})"
                  if ranks.size > 1 else "")
               + (f", {stats.resumed} from an interrupted run" if stats.resumed else "") + ")")
    if writer is None:
        print(summary, file=sys.stderr, flush=True)
        return
    writer.publish()
    print(f"wrote {summary} to {target}", file=out, flush=True)


def read_message(inp) -> Optional[str]:
    """The next line of ``inp`` without its newline, or None at EOF. A line that is not UTF-8 raises a
    :class:`UserInputError` and leaves the next line readable: the bytes are read and decoded here (a text stream
    would raise from inside ``readline``, or smuggle the bad bytes in as surrogates)."""
    raw = getattr(inp, "buffer", None)
    if raw is None:
        line = inp.readline()
        return line.rstrip("\n") if line else None
    data = raw.readline()
    if not data:
        return None
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise UserInputError(f"the message is not valid UTF-8 ({err.reason} at byte {err.start + 1}); "
                             "type it again") from None


def run_chat(args: InferenceArgs, model, tokenizer, sampling, inp=None, out=None) -> None:
    """Terminal REPL: one line per user turn; an empty line, EOF or Ctrl-C at the prompt ends the chat.

    A message that cannot be answered (longer than the context, not UTF-8) prints ``error: ...`` and is forgotten;
    Ctrl-C during a reply stops generating it (the exchange is forgotten) and the chat goes on."""
    inp, out = inp or sys.stdin, out or sys.stdout
    from colossal_llama.inference.chat import ChatSession
    from colossal_llama.inference.prompting import resolve_chat_template

    template = resolve_chat_template(args.model_path, tokenizer, args.chat_template, args.system_message)
    session = ChatSession(model, tokenizer, template, sampling, max_context=args.max_context)
    print(f"chat with {args.model_path} (template {template.name}); empty line or Ctrl-D to quit", file=out, flush=True)
    while True:
        print("User: ", end="", file=out, flush=True)
        try:
            line = read_message(inp)
        except UserInputError as err:
            print(f"error: {err}", file=out, flush=True)
            continue
        except KeyboardInterrupt:
            break
        if line is None or not line.strip():
            break
        answer_in_chat(session, line, out)
    print(f"\n{len(session.history) // 2} exchange(s) kept, {session.dropped_exchanges} dropped for context",
          file=out, flush=True)


def answer_in_chat(session, message: str, out) -> None:
    """Stream the reply to ``message``. A :class:`UserInputError` (the message alone outgrows the context, is not
    UTF-8) or Ctrl-C forgets the exchange and returns: one bad message must not end the whole chat."""
    session.add_user(message)
    print("Assistant: ", end="", file=out, flush=True)
    reply = session.stream_reply()
    try:
        for piece in reply:
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
    except UserInputError as err:
        session.forget_pending()
        print(f"\nerror: {err}", file=out, flush=True)
    except KeyboardInterrupt:
        session.forget_pending()
        print("\n[reply interrupted; that exchange is forgotten]", file=out, flush=True)
    finally:
        reply.close()  # stops generate at its next token when the reply was left unfinished (Ctrl-C)


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    from colossal_llama.inference import reply_file
    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.placement import placement_for
    from colossal_llama.tokenizer.loading import load_tokenizer

    args = parse_args(argv)
    if not args.chat and args.input_txt is None:
        raise UserInputError("nothing to do: pass --input_txt PROMPT_OR_FILE or --chat")
    check_batch_args(args)
    # a bad prompts file: before the model loads
    prompts = None if args.chat else reply_file.Prompts.read(args.input_txt)
    sampling = sampling_from_args(args)
    if args.output is not None:  # resuming an interrupted job with other settings: before the model loads
        reply_file.check_resumable(Path(args.output), job_settings(args, sampling), args.overwrite)
    ranks = Ranks.join()
    if args.chat and ranks.size > 1:
        raise UserInputError("--chat runs in one process: start it without torchrun / colossalai run")
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    placement = placement_for(args.device, ranks.local_size, ranks.local_rank, args.max_gpu_memory)
    tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
    if prompts is not None:
        check_prompt_lengths(args, tokenizer, sampling, prompts)
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.tokenizer_path, placement, tokenizer)
    if args.chat:
        run_chat(args, model, tokenizer, sampling)
    else:
        run_prompts(args, model, tokenizer, sampling, prompts, ranks)
    ranks.close()
    return 0


if __name__ == "__main__":
    main()
