"""Supervised fine-tuning: a chat template, instruction data, loss masks, packing, accuracy.

The course's path: pretrain a decoder on raw text, then fine-tune it on examples of a task with
the loss computed on the outputs only.

Chat template. A conversation is a list of messages {"role": "system" | "user" | "assistant",
"content": text}, each written as <|role|>content<|end|>:

    <|user|>what is 12 + 7?<|end|><|assistant|>19<|end|>

A reply is asked for by ending the prompt with <|assistant|>; the model answers and closes its
turn with <|end|>, where generation stops. The four special tokens are appended to the
tokenizer after its vocabulary (`tokenizers.AddedTokens`: char -> ids V..V+3; gpt2 ->
50257..50260, inside the 50304 padded rows; bpe -> after its <|endoftext|>), so every
pretrained id keeps its meaning; the pretrained embedding table grows by those rows
(`grow_vocab`: the mean of the existing rows plus a little noise). Contents are encoded as plain
text: a "<|end|>" typed by a user is text, never a turn marker.

Loss mask. Tokenised, a conversation is (ids, mask): mask is 1 on the tokens of assistant
contents and on their <|end|> (what the model must learn to produce), 0 on role tokens and
system and user turns. Inputs are ids[:-1], targets ids[1:] with mask[1:]; the loss is the mean
over the unmasked targets of the whole step, across micro-batches (llm_jax/step.py).

Data (`data.source`). "jsonl": JSON Lines at data.path, one example per line, either
{"messages": [...]} (ending with an assistant message) or {"prompt": ..., "response": ...};
a bad line raises UserError naming the file and line. "sft": built-in instructions, no file,
generated from data.sft_seed (llm_jax/instructions.py): arithmetic ("what is 12 + 7?" -> "19"),
string manipulation ("reverse: cat" -> "tac", "uppercase: list" -> "LIST") and a question about
the built-in corpus ("first word: <a line of Python's documentation>"). Held out: the examples
whose last question hashes into val_fraction, so that no question is in both splits, whatever
the order of the file.

Batches are a pure function of (seed, stream, step), as llm_jax.data.get_batch: rows of
block_size positions filled with examples drawn at random. pack=False: one example per row,
right-padded (mask 0 on padding). pack=True: examples are appended to a row while they fit
(until PACK_TRIES draws in a row do not), each with its own segment id (padding: 0); attention
stays within a segment and positions restart there (model.forward's segment_ids_BT). Examples
longer than block_size + 1 tokens are dropped.

Accuracy: exact match of the greedy reply (llm_jax.sampling.generate_batch, stopped at <|end|>)
with the last assistant message of each held-out conversation:

    python -m llm_jax.sft eval --out_dir out/sft      # the fine-tuned model
    python -m llm_jax.sft eval --out_dir out          # the pretrained one, for comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import bpe
from llm_jax import model as gpt
from llm_jax.cli import run_main
from llm_jax.data import read_utf8
from llm_jax.errors import UserError
from llm_jax.instructions import builtin_examples, question_held_out
from llm_jax.tokenizers import (AddedTokens, Tokenizer, base_tokenizer, build_tokenizer,
                                with_added_tokens)

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = [f"<|{role}|>" for role in ROLES] + [END]
SOURCES = ("sft", "jsonl")
PACK_TRIES = 4  # a packed row is closed after this many drawn examples in a row do not fit


# --- The template ------------------------------------------------------------------------------


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages -> the template's text; with add_generation_prompt, ask for a reply."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def parse(text: str) -> list[dict]:
    """The template's text -> messages: the inverse of `render`."""
    turn = re.compile(r"<\|(system|user|assistant)\|>(.*?)<\|end\|>", re.S)
    messages, at = [], 0
    for m in turn.finditer(text):
        if m.start() != at:
            break
        messages.append({"role": m.group(1), "content": m.group(2)})
        at = m.end()
    if at != len(text):
        raise ValueError(f"not a rendered conversation from character {at}: {text[at:][:40]!r}")
    return messages


def chat_tokenizer(tokenizer: Tokenizer) -> AddedTokens:
    return with_added_tokens(tokenizer, CHAT_TOKENS)


def encode_conversation(tokenizer: AddedTokens, messages: list[dict],
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """-> (ids, mask): mask 1 on assistant contents and their <|end|>, 0 elsewhere."""
    ids, mask = [], []
    for m in messages:
        content = tokenizer.base.encode(m["content"])
        train = int(m["role"] == "assistant")
        ids += [tokenizer.ids[f"<|{m['role']}|>"], *content, tokenizer.ids[END]]
        mask += [0] + [train] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.ids["<|assistant|>"])
        mask.append(0)
    return ids, mask


def fit_conversation(tokenizer: AddedTokens, messages: list[dict], limit: int):
    """The prompt ids asking for the next reply, at most `limit` tokens: the oldest turns are
    dropped (a system message stays), and a last turn too long alone is cut from the left.
    -> (ids, the messages kept)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = encode_conversation(tokenizer, system + turns, add_generation_prompt=True)[0]
        if len(ids) <= limit or len(turns) <= 1:
            return ids[-limit:], system + turns
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start at a user turn
            turns = turns[1:]


# --- Examples ----------------------------------------------------------------------------------


def check_example(obj, where: str) -> list[dict]:
    """A parsed JSON line -> its messages, or UserError naming `where` (file:line)."""
    if isinstance(obj, dict) and "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: \"messages\" must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES
                    and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: message {i} must be {{\"role\": one of "
                                f"{', '.join(ROLES)}, \"content\": a string}}")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) \
            and isinstance(obj.get("response"), str):
        return [{"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["response"]}]
    raise UserError(f"{where}: expected {{\"messages\": [...]}} or "
                    f"{{\"prompt\": \"...\", \"response\": \"...\"}}")


def read_jsonl(path: str) -> list[dict]:
    """Examples {"messages", "task", "where"} from a JSON Lines file; blank lines are skipped."""
    if not path:
        raise UserError("data.source=jsonl needs data.path: a .jsonl file of conversations")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.path {path!r} does not exist")
    examples = []
    for n, line in enumerate(read_utf8(file).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        task = obj.get("task", "") if isinstance(obj, dict) else ""
        examples.append({"messages": check_example(obj, where), "task": str(task),
                         "where": where})
    if not examples:
        raise UserError(f"{path!r} has no examples")
    return examples


def held_out(messages: list[dict], val_fraction: float) -> bool:
    """Whether an example is held out: its last question (the last user turn before the reply)
    hashes into the val_fraction, so that equal questions land in the same split."""
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    return question_held_out(users[-1] if users else render(messages[:-1]), val_fraction)


# --- Prepared data and batches -----------------------------------------------------------------


@dataclass
class SFTData:
    tokenizer: AddedTokens
    train: list[tuple[np.ndarray, np.ndarray]]  # (ids, mask) per example
    val: list[tuple[np.ndarray, np.ndarray]]
    val_examples: list[dict]  # the held-out conversations, for accuracy
    meta: dict
    pack: bool = True

    def fit(self, block_size: int) -> tuple[SFTData, int]:
        """Drop examples longer than block_size + 1 tokens -> (data, how many were dropped)."""
        keep = [i for i, (ids, _) in enumerate(self.val) if len(ids) <= block_size + 1]
        train = [e for e in self.train if len(e[0]) <= block_size + 1]
        dropped = len(self.train) + len(self.val) - len(train) - len(keep)
        for split, kept in (("train", train), ("val", keep)):
            if not kept:
                raise UserError(f"no {split} example fits in block_size + 1 = {block_size + 1} "
                                "tokens: shorten the examples or use a longer context")
        return dataclasses.replace(self, train=train, val=[self.val[i] for i in keep],
                                   val_examples=[self.val_examples[i] for i in keep]), dropped

    def get_batch(self, split: str, *, seed: int, step: int, batch_size: int, block_size: int,
                  stream: int = 0):
        """-> (x, y, mask, segment ids or None), int32/float32 (B, T), from (seed, stream, step)."""
        examples = self.train if split == "train" else self.val
        rng = np.random.default_rng([seed, stream, step])
        x_BT, y_BT = np.zeros((2, batch_size, block_size), np.int32)
        mask_BT = np.zeros((batch_size, block_size), np.float32)
        seg_BT = np.zeros((batch_size, block_size), np.int32)
        for b in range(batch_size):
            t, s, misses = 0, 0, 0
            while misses < PACK_TRIES and (self.pack or s == 0):
                ids, mask = examples[rng.integers(len(examples))]
                n = len(ids) - 1
                if t + n > block_size:  # never the first (see `fit`)
                    misses += 1
                    continue
                x_BT[b, t:t + n], y_BT[b, t:t + n] = ids[:-1], ids[1:]
                mask_BT[b, t:t + n], seg_BT[b, t:t + n] = mask[1:], s + 1
                t, s, misses = t + n, s + 1, 0
        return x_BT, y_BT, mask_BT, seg_BT if self.pack else None


def load_examples(data_cfg) -> tuple[list[dict], str]:
    if data_cfg.source == "sft":
        return (builtin_examples(data_cfg.sft_examples, data_cfg.sft_tasks, data_cfg.sft_seed,
                                 data_cfg.val_fraction),
                f"built-in instructions ({data_cfg.sft_examples:,}, tasks {data_cfg.sft_tasks}, "
                f"seed {data_cfg.sft_seed})")
    if data_cfg.source == "jsonl":
        return read_jsonl(data_cfg.path), f"JSON Lines file {data_cfg.path!r}"
    raise UserError(f"data.source={data_cfg.source} is not fine-tuning data: use sft or jsonl")


def base_for(data_cfg, examples: list[dict]) -> Tokenizer:
    """The tokenizer of data.tokenizer when no pretrained model brings one."""
    if data_cfg.tokenizer == "bpe":
        if not data_cfg.bpe_path:
            raise UserError("fine-tuning with data.tokenizer=bpe needs data.bpe_path")
        return bpe.load(data_cfg.bpe_path)
    text = "".join(m["content"] for e in examples for m in e["messages"])
    return build_tokenizer(data_cfg.tokenizer, text or " ")


def encode_examples(tokenizer: AddedTokens, examples: list[dict]):
    out = []
    for e in examples:
        try:
            ids, mask = encode_conversation(tokenizer, e["messages"])
        except UserError as err:
            raise UserError(f"{e['where']}: {err}") from None
        out.append((np.asarray(ids, np.int32), np.asarray(mask, np.float32)))
    return out


def prepare(data_cfg, tokenizer: Tokenizer | None = None) -> SFTData:
    """The configured fine-tuning data, tokenized with `tokenizer` (a pretrained model's,
    or built from data.tokenizer) plus the chat tokens, split into train and held-out."""
    examples, description = load_examples(data_cfg)
    tokenizer = chat_tokenizer(tokenizer if tokenizer is not None
                               else base_for(data_cfg, examples))
    split = [held_out(e["messages"], data_cfg.val_fraction) for e in examples]
    train = [e for e, v in zip(examples, split) if not v]
    val = list({render(e["messages"]): e for e, v in zip(examples, split) if v}.values())
    if not train or not val:
        raise UserError(f"{description} has {len(train)} training and {len(val)} held-out "
                        f"examples: use more examples or change data.val_fraction")
    train_ids, val_ids = encode_examples(tokenizer, train), encode_examples(tokenizer, val)
    meta = {"source_description": description, "train_examples": len(train),
            "val_examples": len(val), "train_tokens": sum(len(i) for i, _ in train_ids),
            "val_tokens": sum(len(i) for i, _ in val_ids)}
    return SFTData(tokenizer, train_ids, val_ids, val, meta, data_cfg.pack)


def grow_vocab(cfg: gpt.ModelConfig, params: dict, vocab_size: int, key):
    """Make room for added tokens: rows vocab_size..new of `wte` become the mean of the existing
    rows plus N(0, 0.02) noise (the tied head then scores them like an average token); the
    existing rows are unchanged. -> (config, params)."""
    old = cfg.vocab_size
    new_cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    table = params["wte"]["embedding"]
    rows = new_cfg.padded_vocab_size
    grown = jnp.zeros((rows, table.shape[1]), table.dtype).at[:min(rows, len(table))].set(
        table[:rows])
    noise = 0.02 * jax.random.normal(key, (vocab_size - old, table.shape[1]), table.dtype)
    grown = grown.at[old:vocab_size].set(table[:old].mean(axis=0) + noise)
    return new_cfg, {**params, "wte": {**params["wte"], "embedding": grown}}


# --- Accuracy ----------------------------------------------------------------------------------


def reply_text(tokenizer: AddedTokens, ids: list[int]) -> str:
    """The generated reply up to (without) the first special token."""
    cut = next((i for i, t in enumerate(ids) if t >= tokenizer.base.vocab_size), len(ids))
    return tokenizer.decode(ids[:cut])


def accuracy(graphdef, params, tokenizer: AddedTokens, examples: list[dict],
             batch_size: int = 128) -> tuple[float, list[dict]]:
    """Exact match of greedy replies with the last assistant message -> (accuracy, rows)."""
    from llm_jax.sampling import generate_batch

    rows = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [encode_conversation(tokenizer, e["messages"][:-1], True)[0] for e in chunk]
        longest = max(len(tokenizer.base.encode(e["messages"][-1]["content"])) for e in chunk)
        outs = generate_batch(graphdef, params, prompts, max_new_tokens=longest + 4,
                              key=jax.random.key(0), temperature=0.0,
                              stop_id=tokenizer.ids[END])
        for e, out in zip(chunk, outs):
            reply, want = reply_text(tokenizer, out), e["messages"][-1]["content"]
            asked = e["messages"][-2]["content"] if len(e["messages"]) > 1 else ""
            rows.append({"task": e.get("task", ""), "prompt": asked, "want": want,
                         "got": reply, "ok": reply.strip() == want.strip()})
    return sum(r["ok"] for r in rows) / max(len(rows), 1), rows


def eval_command(args) -> None:
    from llm_jax.config import DataConfig
    from llm_jax.inference import load_model

    graphdef, params, config, tokenizer = load_model(args.out_dir, args.ckpt)
    model_cfg = config.model
    if not isinstance(tokenizer, AddedTokens):  # a pretrained model: as fine-tuning starts
        tokenizer = chat_tokenizer(tokenizer)
        model_cfg, params = grow_vocab(model_cfg, params, tokenizer.vocab_size,
                                       jax.random.key(0))
        graphdef = gpt.abstract_params(model_cfg)[0]
        print(f"note: {args.out_dir} has no chat tokens: evaluating it with "
              f"{len(CHAT_TOKENS)} new embedding rows, as fine-tuning starts from")
    data_cfg = config.data if config.data.source in SOURCES else DataConfig(source="sft")
    if args.source:
        data_cfg = dataclasses.replace(data_cfg, source=args.source, path=args.path)
    if args.val_fraction:
        data_cfg = dataclasses.replace(data_cfg, val_fraction=args.val_fraction)
    data = prepare(data_cfg, base_tokenizer(tokenizer))
    data, _ = data.fit(model_cfg.block_size)
    examples = data.val_examples[:args.n] if args.n else data.val_examples
    acc, rows = accuracy(graphdef, params, tokenizer, examples, args.batch_size)
    for r in rows[:args.show]:
        print(f"{'ok ' if r['ok'] else 'bad'} {r['prompt']!r} -> {r['got']!r} "
              f"(want {r['want']!r})")
    by_task: dict[str, list[bool]] = {}
    for r in rows:
        by_task.setdefault(r["task"] or "all", []).append(r["ok"])
    if len(by_task) > 1:
        print("by task: " + ", ".join(f"{t} {sum(v) / len(v):.1%} ({len(v)})"
                                      for t, v in sorted(by_task.items())))
    print(f"held-out accuracy: {acc:.1%} ({sum(r['ok'] for r in rows)}/{len(rows)} exact "
          f"matches, greedy) for {args.out_dir}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m llm_jax.sft",
                                description="Supervised fine-tuning: evaluation.")
    commands = p.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("eval", help="held-out exact-match accuracy of greedy replies")
    ev.add_argument("--out_dir", default="out/sft", help="a run directory (fine-tuned or not)")
    ev.add_argument("--ckpt", default="latest", choices=("latest", "best"))
    ev.add_argument("--source", default="", choices=("", *SOURCES),
                    help="the data (default: the run's own if it is fine-tuning data, else sft)")
    ev.add_argument("--path", default="", help="--source jsonl: the file")
    ev.add_argument("--val_fraction", type=float, default=0.0,
                    help="the held-out share, as in training (default: the run's, else 0.1)")
    ev.add_argument("--n", type=int, default=500, help="held-out examples to score (0: all)")
    ev.add_argument("--batch_size", type=int, default=128)
    ev.add_argument("--show", type=int, default=5, help="print this many replies")
    eval_command(p.parse_args(argv))


if __name__ == "__main__":
    run_main(main)
