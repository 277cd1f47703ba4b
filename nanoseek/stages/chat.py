"""`nanoseek chat --model DIR`: a terminal chat with a checkpoint, through the R1 chat template.

Each turn renders the whole conversation with the tokenizer's chat template (spec §12: earlier
assistant turns keep only their answers) plus the generation prompt "<｜Assistant｜><think>\\n", so
the model starts inside its reasoning. The reply streams: reasoning dimmed (ANSI faint) until
"</think>", then the answer in normal text. The prefix cache makes each turn cheap: the rendered
history is the previous prompt plus the new turn, so only the new tokens are computed (the
stripped reasoning of the previous answer is the part that is not reused).
Commands: /clear (new conversation), /exit (or end of input). Ctrl-C stops a reply.
"""
from __future__ import annotations

import sys

from nanoseek.engine.loading import sampling_defaults

DIM, RESET = "\033[2m", "\033[0m"
END_THINK = "</think>"


def add_arguments(p):
    p.add_argument("--model", required=True, help="checkpoint directory with a tokenizer and chat template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: generation_config.json)")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per reply at most")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-color", action="store_true", help="no ANSI styling (default when not a terminal)")


class ReplyPrinter:
    """Prints a growing reply: reasoning (before </think>) dimmed, then the answer."""

    def __init__(self, write, color: bool):
        self.write, self.color = write, color
        self.shown_reasoning = self.shown_answer = 0
        self.in_answer = False

    def update(self, text: str, final: bool = False) -> None:
        reasoning, sep, answer = text.partition(END_THINK)
        if not sep and not final:     # hold back a tail that may be the start of "</think>"
            tail = next((k for k in range(min(len(END_THINK) - 1, len(reasoning)), 0, -1)
                         if END_THINK.startswith(reasoning[-k:])), 0)
            reasoning = reasoning[:len(reasoning) - tail]
        if len(reasoning) > self.shown_reasoning:
            chunk = reasoning[self.shown_reasoning:]
            self.write(DIM + chunk + RESET if self.color else chunk)
            self.shown_reasoning = len(reasoning)
        if sep:
            if not self.in_answer:
                self.write("\n" if self.color else "\n" + END_THINK)
                self.in_answer = True
            if len(answer) > self.shown_answer:
                self.write(answer[self.shown_answer:])
                self.shown_answer = len(answer)


def reply(llm, messages: list[dict], params, write, color: bool) -> str:
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    rid = llm.add_request(ids, params)
    printer, text = ReplyPrinter(write, color), ""
    try:
        done = False
        while not done:
            for out in llm.step():
                if out.request_id == rid:
                    text, done = out.outputs[0].text, out.finished
                    printer.update(text, final=done)
    except KeyboardInterrupt:
        llm.abort(rid)
        printer.update(text, final=True)
    write("\n")
    return text


def main(args) -> int:
    from nanoseek.engine import LLM, SamplingParams
    llm = LLM(args.model)
    if not hasattr(llm.tokenizer, "apply_chat_template"):
        print(f"{args.model}: the tokenizer has no R1 chat template", file=sys.stderr)
        return 2
    temp, top_p = sampling_defaults(args.model)
    params = SamplingParams(temperature=temp if args.temperature is None else args.temperature,
                            top_p=top_p if args.top_p is None else args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    color = sys.stdout.isatty() and not args.no_color
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())   # noqa: E731
    print("nanoseek chat — /clear for a new conversation, /exit to leave")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        write("assistant> ")
        text = reply(llm, messages, params, write, color)
        messages.append({"role": "assistant", "content": "<think>\n" + text})
    print()
    return 0
