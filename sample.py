"""Sample text from a trained GPT, streamed to stdout as it is generated.

    python sample.py                                    # from out/, the default run of train.py
    python sample.py --out_dir out/shakespeare --prompt "ROMEO:" --num_samples 3
    echo "def main():" | python sample.py --prompt -    # prompt from stdin
    python sample.py --prompt_file prompt.txt --temperature 0 --max_new_tokens 200
    python sample.py --init_from gpt2 --prompt "Hello"   # a Hugging Face GPT-2 directory
    python sample.py --out_dir out/sft --chat --temperature 0   # chat: a user turn per line
"""

import argparse
import itertools
import sys

import jax

from llm_jax import compile_cache, sft
from llm_jax.cli import run_main
from llm_jax.errors import UserError
from llm_jax.hf import load_pretrained
from llm_jax.inference import load_model
from llm_jax.beam import beam_search
from llm_jax.sampling import (cut_at_stop, generate, generate_batch, stop_strings,
                              stream_text)
from llm_jax.tokenizers import AddedTokens, gpt2_tokenizer


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample from a trained llm_jax checkpoint.")
    p.add_argument("--out_dir", default="out", help="the run directory train.py wrote")
    p.add_argument("--ckpt", default="latest", choices=("latest", "best"))
    p.add_argument("--init_from", default="", help="instead of --out_dir: a Hugging Face GPT-2 "
                   "directory (config.json + model.safetensors), with GPT-2's tokenizer")
    p.add_argument("--prompt", default=None, help="the prompt text, or - to read stdin")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 means no top-k filtering")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1 means off")
    p.add_argument("--stop", action="append", default=[],
                   help="stop when this text appears (repeatable); it is not printed")
    p.add_argument("--beam", type=int, default=0, help="beam search with this width (> 1): "
                   "deterministic, ignores temperature/top_k/top_p, prints one result")
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam search score: logp / length**length_penalty")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--chat", action="store_true", help="chat with a fine-tuned model "
                   "(train.py sft): each line of stdin is a user turn, until end of input")
    p.add_argument("--system", default="", help="--chat: a system message opening the chat")
    return p.parse_args(argv)


def chat(args, graphdef, params, model_cfg, tokenizer) -> None:
    """Read user turns from stdin, stream each reply up to <|end|>; the conversation is kept
    within the context by dropping its oldest turns."""
    if not isinstance(tokenizer, AddedTokens) or sft.END not in tokenizer.ids:
        raise UserError(f"the model in {args.out_dir!r} has no chat tokens: fine-tune it first, "
                        f"e.g. python train.py sft --init_from={args.out_dir} --out_dir=out/sft")
    n_base, S = tokenizer.base.vocab_size, model_cfg.block_size
    room = min(args.max_new_tokens, S // 2)  # context kept free for the reply
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    for turn in itertools.count():
        if interactive:
            print("you: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        try:
            ids, kept = sft.fit_conversation(
                tokenizer, messages + [{"role": "user", "content": line.rstrip("\r\n")}],
                S - room)
        except UserError as e:  # e.g. a character outside a char vocabulary: skip the turn
            print(f"error: {e}", file=sys.stderr)
            continue
        messages = kept
        reply: list[int] = []

        def until_special(new_ids):
            for t in new_ids:
                if t >= n_base:  # <|end|> (or another turn marker): the reply is over
                    return
                reply.append(t)
                yield t

        new_ids = generate(graphdef, params, ids, max_new_tokens=args.max_new_tokens,
                           key=jax.random.fold_in(jax.random.key(args.seed), turn),
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           stop=lambda out: out[-1] >= n_base)
        for piece in stream_text(tokenizer, until_special(new_ids)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def read_prompt(args, tokenizer) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt_file, not both")
    if args.prompt_file is not None:
        try:
            return open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file!r}: {e}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is not None:
        return args.prompt
    return "<|endoftext|>" if tokenizer.eot_id is not None else "\n"


def main(argv: list[str]) -> None:
    args = parse(argv)
    compile_cache.enable()
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        raise UserError("num_samples and max_new_tokens must be >= 1; temperature, top_k >= 0")
    if args.init_from:
        graphdef, params, model_cfg, tokenizer = load_pretrained(args.init_from)
        tokenizer = tokenizer or gpt2_tokenizer()
    else:
        graphdef, params, config, tokenizer = load_model(args.out_dir, args.ckpt)
        model_cfg = config.model
    if not 0 < args.top_p <= 1:
        raise UserError("top_p must be in (0, 1]")
    if args.chat:
        return chat(args, graphdef, params, model_cfg, tokenizer)
    prompt = read_prompt(args, tokenizer)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty after tokenization")
    if max(ids) >= model_cfg.vocab_size:
        raise UserError(f"the prompt has token id {max(ids)}, outside the model's vocabulary of "
                        f"{model_cfg.vocab_size}")
    if len(ids) > model_cfg.block_size:
        print(f"note: the prompt has {len(ids)} tokens; keeping the last "
              f"{model_cfg.block_size} (the context length)", file=sys.stderr)
        ids = ids[-model_cfg.block_size:]
    key = jax.random.key(args.seed)
    if args.beam > 1:
        out = beam_search(graphdef, params, ids, beam=args.beam,
                          max_new_tokens=min(args.max_new_tokens, model_cfg.block_size - 1),
                          length_penalty=args.length_penalty, stop_id=tokenizer.eot_id)
        print(prompt + cut_at_stop(tokenizer.decode(out), args.stop)[0])
        return
    options = dict(max_new_tokens=args.max_new_tokens, key=key, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_id=tokenizer.eot_id,
                   stop=stop_strings(tokenizer, args.stop))
    if args.num_samples == 1:  # stream to stdout as the tokens come
        sys.stdout.write(prompt)
        shown = ""
        for piece in stream_text(tokenizer, generate(graphdef, params, ids, **options)):
            text, stopped = cut_at_stop(shown + piece, args.stop)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
            if stopped:
                break
        print()
        return
    # Several samples: one batch; each is printed whole, in order, once the batch is done.
    outs = generate_batch(graphdef, params, [ids] * args.num_samples, **options)
    for i, out in enumerate(outs):
        if i:
            print("\n---------------")
        print(prompt + cut_at_stop(tokenizer.decode(out), args.stop)[0])


if __name__ == "__main__":
    run_main(main)
