"""Python functions for real models: generated list, string and number problems, judged by the sandbox (``pyfunc``).

The code benchmarks (MBPP, HumanEval) are far beyond a 135M-270M model (SmolLM2-135M-Instruct
solves ~0-2% of them), so RL through the code verifier needs problems where a small model is
sometimes right: functions of one to five lines, written from a signature and a docstring.

A problem is one of :data:`TEMPLATES` (sum/count/filter by a predicate, map, running totals,
clamp, digits, characters, words, divisibility...) with random constants, a function name and an
argument name, so there are tens of thousands of distinct problems.  The prompt is the stub:

    def count_matching(xs: list[int]) -> int:
        \"\"\"Return how many numbers in xs are greater than 7.

        >>> count_matching([3, 9, 12])
        2
        \"\"\"

and the completion is the body.  ``chat = "auto"``: a base model (Gemma-3-270M) gets the stub as
plain text and continues it; an instruct model (SmolLM2) gets "Complete the following Python
function" with the stub in a fenced block as its user turn, and the answer's start written for it
(``ANSWER_START``: the fence and the stub again, after the chat template's assistant header), so it
too continues the body.  The verifier takes either form (:meth:`PyFuncTask.program`): a body is
joined to the stub; a completion that writes the whole function (in a fence or bare) replaces it.

Tests: five asserts on random inputs (never the docstring's), hidden from the prompt, with at least
two different expected values; the expected values come from the template's reference body,
run here on the trusted side when the problem is made.  Verdicts: the project's code verifier
(:func:`t2dist.verifiers.code.check_code_batch`, the sandbox), as the code benchmarks'.

Splits: by a hash of the prompt (the :class:`SyntheticTask` machinery, ``split_by = "hash"``): 2000
/ 200 / 400.  A problem's example and tests are drawn from its own seed (template, name, argument
and docstring), so a problem is one prompt and lands in one split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

from t2dist.tasks.base import Example, Verdict, apply_chat_template, register_task
from t2dist.tasks.synthetic import SyntheticTask
from t2dist.tasks.words import word_list
from t2dist.verifiers.answers import extract_code
from t2dist.verifiers.code import code_verdicts

INTS, STRS, WORDS, NUMS = ("xs", "nums", "numbers", "values"), ("s", "text", "sentence"), ("words", "items"), ("n", "x")
N_TESTS = 5

# -- inputs -----------------------------------------------------------------------------------


def int_list(lo: int = -9, hi: int = 20, max_len: int = 7) -> Callable[[random.Random], list[int]]:
    return lambda rng: [rng.randint(lo, hi) for _ in range(rng.randint(0, max_len))]


@lru_cache(maxsize=None)
def _words_up_to(n: int) -> tuple[str, ...]:
    return tuple(w for w in word_list() if len(w) <= n)


def short_words(rng: random.Random, k: int) -> list[str]:
    pool = _words_up_to(7)  # 4-7 letters
    return [rng.choice(pool) for _ in range(k)]


def sentence(rng: random.Random) -> str:
    return " ".join(short_words(rng, rng.randint(1, 5)))


def word_items(rng: random.Random) -> list[str]:
    return short_words(rng, rng.randint(0, 6))


# -- predicates on integers (x) ---------------------------------------------------------------


def int_predicate(rng: random.Random, x: str = "x") -> tuple[str, str]:
    """``(words, python condition on x)``: e.g. ``("greater than 7", "x > 7")``."""
    kind = rng.randrange(8)
    k = rng.randint(2, 9)
    t = rng.randint(-5, 15)
    return [(f"divisible by {k}", f"{x} % {k} == 0"), (f"not divisible by {k}", f"{x} % {k} != 0"),
            (f"greater than {t}", f"{x} > {t}"), (f"less than {t}", f"{x} < {t}"),
            (f"at least {t}", f"{x} >= {t}"), (f"at most {t}", f"{x} <= {t}"),
            (f"between {t} and {t + k} (inclusive)", f"{t} <= {x} <= {t + k}"),
            rng.choice([("even", f"{x} % 2 == 0"), ("odd", f"{x} % 2 == 1"), ("positive", f"{x} > 0"),
                        ("negative", f"{x} < 0")])][kind]


# -- problems ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One problem: the function's name, argument, types, docstring sentence, reference body and inputs."""

    template: str
    name: str
    arg: str
    arg_type: str
    ret_type: str
    doc: str
    body: str  # indented by four spaces, ends with a newline
    draw: Callable[[random.Random], Any]  # one random input

    @property
    def key(self) -> str:
        return f"{self.template}|{self.name}({self.arg}: {self.arg_type}) -> {self.ret_type}|{self.doc}"


def _spec(template: str, names: Sequence[str], args: Sequence[str], arg_type: str, ret_type: str,
          text: Callable[[random.Random], dict], draw: Callable[[random.Random], Any]) -> Callable[[random.Random], Spec]:
    """A template: ``text(rng)`` gives the docstring sentence and the body (``doc``, ``body``, formatted
    with ``a``, the argument name; optionally ``ret``, the return type, and ``draw``, the inputs)."""
    def make(rng: random.Random) -> Spec:
        name, arg = rng.choice(names), rng.choice(args)
        parts = text(rng)
        return Spec(template, name, arg, arg_type, parts.get("ret", ret_type), parts["doc"].format(a=arg),
                    parts["body"].format(a=arg), parts.get("draw", draw))
    return make


def _where(template: str, names: Sequence[str], ret_type: str, doc: str, body: str) -> Callable[[random.Random], Spec]:
    """A template over a list of integers and a random predicate (:func:`int_predicate`)."""
    def text(rng: random.Random) -> dict:
        words, cond = int_predicate(rng)
        return {"doc": doc.replace("{pred}", words), "body": body.replace("{cond}", cond)}
    return _spec(template, names, INTS, "list[int]", ret_type, text, int_list())


def _affine(rng):
    m, b = rng.randint(2, 9), rng.randint(1, 9)
    expr, words = rng.choice([(f"x * {m} + {b}", f"x * {m} + {b}"), (f"x * {m} - {b}", f"x * {m} - {b}"),
                              (f"x * x + {b}", f"x * x + {b}"), (f"abs(x) * {m}", f"abs(x) * {m}"),
                              (f"x // {m}", f"x // {m} (integer division)"), (f"x % {m}", f"x % {m}")])
    return {"doc": f"Return a list with each number x in {{a}} replaced by {words}.",
            "body": f"    return [{expr} for x in {{a}}]\n"}


def _running(rng):
    k = rng.choice([0, 0, 0, rng.randint(1, 20)])
    what = rng.choice(["sum", "maximum", "minimum"])
    if what == "sum":
        start = f" plus {k}" if k else ""
        return {"doc": f"Return the running sums of {{a}}: element i of the result is the sum of {{a}}[0] .. "
                       f"{{a}}[i]{start}.",
                "body": f"    out, acc = [], {k}\n    for x in {{a}}:\n        acc += x\n        out.append(acc)\n"
                        "    return out\n"}
    fn = "max" if what == "maximum" else "min"
    return {"doc": f"Return the running {what}s of {{a}}: element i of the result is the {what} of {{a}}[0] .. {{a}}[i].",
            "body": f"    out = []\n    for x in {{a}}:\n        out.append(x if not out else {fn}(out[-1], x))\n"
                    "    return out\n"}


def _count_chars(rng):
    if rng.random() < 0.2:
        chars, words = "aeiou", "vowels (a, e, i, o, u)"
    else:
        chars = "".join(sorted(rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(1, 3))))
        words = f"the letter '{chars}'" if len(chars) == 1 else "one of the letters " + ", ".join(f"'{c}'" for c in chars)
    return {"doc": f"Return how many characters of {{a}} are {words}.",
            "body": f"    return sum(1 for c in {{a}} if c in '{chars}')\n"}


def _replace(rng):
    x, y = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    y = rng.choice([y, y.upper(), "*", "-", "_", ""])
    shown = f"'{y}'" if y else "nothing (remove it)"
    return {"doc": f"Return {{a}} with every '{x}' replaced by {shown}.",
            "body": f"    return {{a}}.replace('{x}', '{y}')\n"}


def _words(rng):
    sep = rng.choice([" ", "-", "_", ",", ", ", "|", "/", "+", ":", ";", "."])
    case, method = rng.choice([("", ""), (" in upper case", ".upper()"), (" in lower case", ".lower()"),
                               (" with its first letter in upper case", ".capitalize()")])
    order, rev = rng.choice([("in reverse order", "[::-1]"), ("in their original order", "")])
    return {"doc": f"Return the words of {{a}} (separated by single spaces) {order}, each{case or ' unchanged'}, "
                   f"joined by '{sep}'.",
            "body": f"    return '{sep}'.join(w{method} for w in {{a}}.split(' '){rev})\n"}


def _filter_words(rng):
    k, c = rng.randint(4, 7), rng.choice("abcdefghilmnoprstuw")
    doc, cond = rng.choice([(f"have more than {k} letters", f"len(w) > {k}"), (f"have fewer than {k} letters", f"len(w) < {k}"),
                            (f"have exactly {k} letters", f"len(w) == {k}"), (f"start with '{c}'", f"w.startswith('{c}')"),
                            (f"end with '{c}'", f"w.endswith('{c}')"), (f"contain '{c}'", f"'{c}' in w"),
                            (f"do not contain '{c}'", f"'{c}' not in w")])
    return {"doc": f"Return the words in {{a}} that {doc}, in their original order.",
            "body": f"    return [w for w in {{a}} if {cond}]\n"}


def _count_words(rng):
    c = rng.choice("abcdefghilmnoprstuw")
    doc, cond = rng.choice([(f"start with the letter '{c}'", f"w.startswith('{c}')"),
                            (f"end with the letter '{c}'", f"w.endswith('{c}')"),
                            (f"contain the letter '{c}'", f"'{c}' in w")])
    return {"doc": f"Return how many words of {{a}} {doc} (words are separated by single spaces).",
            "body": f"    return sum(1 for w in {{a}}.split(' ') if {cond})\n"}


def _divisible(rng):
    p, q = rng.sample(range(2, 13), 2)
    doc, cond = rng.choice([(f"by {p} and by {q}", f"{{a}} % {p} == 0 and {{a}} % {q} == 0"),
                            (f"by {p} or by {q}", f"{{a}} % {p} == 0 or {{a}} % {q} == 0"),
                            (f"by {p} but not by {q}", f"{{a}} % {p} == 0 and {{a}} % {q} != 0")])
    # multiples of p, of p*q and any number: both answers turn up whatever p and q are
    return {"doc": f"Return True if {{a}} is divisible {doc}, otherwise False.", "body": f"    return {cond}\n",
            "draw": lambda r: r.choice([r.randint(0, 120), p * r.randint(0, 12), p * q * r.randint(0, 3)])}


def _scalar(rng):
    m, b = rng.randint(2, 9), rng.randint(1, 20)
    doc, expr = rng.choice([(f"{{a}} multiplied by {m}, plus {b}", f"{{a}} * {m} + {b}"),
                            (f"{{a}} multiplied by {m}, minus {b}", f"{{a}} * {m} - {b}"),
                            (f"{{a}} squared, plus {b}", f"{{a}} * {{a}} + {b}"),
                            (f"{{a}} divided by {m}, rounded down", f"{{a}} // {m}"),
                            (f"the remainder of {{a}} divided by {m}", f"{{a}} % {m}"),
                            (f"the absolute value of {{a}}, plus {b}", f"abs({{a}}) + {b}")])
    return {"doc": f"Return {doc}.", "body": f"    return {expr}\n"}


def _predicate(rng):
    words, cond = int_predicate(rng, "{a}")
    return {"doc": f"Return True if {{a}} is {words}, otherwise False.", "body": f"    return {cond}\n"}


def _nonempty(rng: random.Random) -> list[int]:
    return [rng.randint(-9, 20) for _ in range(rng.randint(1, 7))]


def _list_stat(rng):
    k = rng.randint(1, 9)
    doc, expr = rng.choice([(f"the sum of the numbers in {{a}}, plus {k}", f"sum({{a}}) + {k}"),
                            (f"the sum of the numbers in {{a}}, times {k}", f"sum({{a}}) * {k}"),
                            (f"the largest number in {{a}}, plus {k}", f"max({{a}}) + {k}"),
                            (f"the smallest number in {{a}}, minus {k}", f"min({{a}}) - {k}"),
                            (f"the number of elements of {{a}}, times {k}", f"len({{a}}) * {k}"),
                            (f"the sum of the first {k} numbers in {{a}}", f"sum({{a}}[:{k}])"),
                            (f"how many times {k} appears in {{a}}", f"{{a}}.count({k})")])
    return {"doc": f"Return {doc} ({{a}} is not empty).", "body": f"    return {expr}\n", "draw": _nonempty}


def _list_op(rng):
    k = rng.randint(1, 9)
    doc, expr = rng.choice([("sorted in increasing order", "sorted({a})"),
                            ("sorted in decreasing order", "sorted({a}, reverse=True)"),
                            ("in reverse order", "{a}[::-1]"),
                            (f"with {k} added at the end", f"{{a}} + [{k}]"),
                            (f"with {k} added at the front", f"[{k}] + {{a}}"),
                            (f"without its first {k} elements", f"{{a}}[{k}:]"),
                            (f"without its last element, followed by {k}", f"{{a}}[:-1] + [{k}]"),
                            (f"with every element increased by {k}", f"[x + {k} for x in {{a}}]")])
    return {"doc": f"Return {{a}} {doc}, as a new list.", "body": f"    return {expr}\n"}


def _str_op(rng):
    k = rng.randint(1, 5)
    w = rng.choice(["!", "?", ".", "...", "-", ":", "#", "ok", "end", "yes", "abc", "xyz"])
    doc, expr = rng.choice([(f"in upper case, followed by '{w}'", f"{{a}}.upper() + '{w}'"),
                            (f"in lower case, followed by '{w}'", f"{{a}}.lower() + '{w}'"),
                            (f"reversed, followed by '{w}'", f"{{a}}[::-1] + '{w}'"),
                            (f"with '{w}' added at the front", f"'{w}' + {{a}}"),
                            (f"with '{w}' added at both ends", f"'{w}' + {{a}} + '{w}'"),
                            (f"cut to its first {k} characters", f"{{a}}[:{k}]"),
                            (f"cut to its last {k} characters", f"{{a}}[-{k}:]"),
                            (f"with its spaces replaced by '{w}'", f"{{a}}.replace(' ', '{w}')")])
    return {"doc": f"Return {{a}} {doc}.", "body": f"    return {expr}\n"}


TEMPLATES: dict[str, Callable[[random.Random], Spec]] = {
    "scalar": _spec("scalar", ("compute", "calc", "formula"), NUMS, "int", "int", _scalar,
                    lambda rng: rng.randint(-20, 40)),
    "predicate": _spec("predicate", ("check", "is_match", "test_number"), NUMS, "int", "bool", _predicate,
                       lambda rng: rng.randint(-10, 30)),
    "list_stat": _spec("list_stat", ("list_stat", "summarize", "score"), INTS, "list[int]", "int", _list_stat,
                       _nonempty),
    "list_op": _spec("list_op", ("rearrange", "modify_list", "new_list"), INTS, "list[int]", "list[int]", _list_op,
                     int_list()),
    "str_op": _spec("str_op", ("decorate", "change_text", "edit"), STRS, "str", "str", _str_op, sentence),
    "sum_where": _where("sum_where", ("sum_matching", "sum_selected", "selected_total"), "int",
                        "Return the sum of the numbers in {a} that are {pred}.", "    return sum(x for x in {a} if {cond})\n"),
    "count_where": _where("count_where", ("count_matching", "count_selected", "how_many"), "int",
                          "Return how many numbers in {a} are {pred}.", "    return sum(1 for x in {a} if {cond})\n"),
    "filter_where": _where("filter_where", ("keep_matching", "select_numbers", "filter_numbers"), "list[int]",
                           "Return a list of the numbers in {a} that are {pred}, in their original order.",
                           "    return [x for x in {a} if {cond}]\n"),
    "map": _spec("map", ("transform", "map_numbers", "apply_rule"), INTS, "list[int]", "list[int]", _affine,
                 int_list()),
    "running": _spec("running", ("running", "accumulate", "prefix_values"), INTS, "list[int]", "list[int]",
                     _running, int_list()),
    "count_chars": _spec("count_chars", ("count_letters", "letter_count", "count_chars"), STRS, "str", "int",
                         _count_chars, sentence),
    "replace": _spec("replace", ("replace_letter", "swap_letter", "substitute"), STRS, "str", "str", _replace,
                     sentence),
    "words": _spec("words", ("rejoin_words", "format_words", "join_words"), STRS, "str", "str", _words, sentence),
    "filter_words": _spec("filter_words", ("filter_words", "select_words", "keep_words"), WORDS, "list[str]",
                          "list[str]", _filter_words, word_items),
    "count_words": _spec("count_words", ("count_words", "words_matching", "word_count"), STRS, "str", "int",
                         _count_words, sentence),
    "divisible": _spec("divisible", ("check_divisible", "is_divisible", "divides"), NUMS, "int", "bool",
                       _divisible, lambda rng: rng.randint(0, 120)),
}


# -- the stub, the reference and the tests ----------------------------------------------------


def stub_of(spec: Spec, example_input: Any, example_output: Any) -> str:
    return (f"def {spec.name}({spec.arg}: {spec.arg_type}) -> {spec.ret_type}:\n"
            f'    """{spec.doc}\n\n    >>> {spec.name}({example_input!r})\n    {example_output!r}\n    """\n')


def reference(spec: Spec) -> Callable[[Any], Any]:
    """The template's reference function, compiled here (trusted code: the template's own body)."""
    scope: dict[str, Any] = {}
    exec(f"def {spec.name}({spec.arg}):\n{spec.body}", scope)  # noqa: S102 - the template's body, not a model's
    return scope[spec.name]


def _trivial(value: Any) -> bool:
    return value in (0, -1, None, "", [], False)


def draw_cases(spec: Spec, fn: Callable[[Any], Any], rng: random.Random) -> tuple[tuple[Any, Any], list[tuple[Any, Any]]]:
    """``(docstring example, hidden tests)``.  The example has a non-trivial answer where one turns up in 50
    draws.  The :data:`N_TESTS` tests are other inputs taken from 40 draws in turn from each kind of case
    (a trivial answer such as 0 or [], the input returned unchanged, anything else), different answers
    first, so that a function that always returns 0, or its argument, fails."""
    example = None
    for _ in range(50):
        x = spec.draw(rng)
        example = (x, fn(x))
        if not _trivial(example[1]):
            break
    pool: dict[str, tuple[Any, Any]] = {}
    for _ in range(40):
        x = spec.draw(rng)
        if repr(x) != repr(example[0]):
            pool.setdefault(repr(x), (x, fn(x)))
    kinds: dict[tuple[bool, bool], list[tuple[Any, Any]]] = {}
    for x, y in pool.values():
        kinds.setdefault((_trivial(y), repr(y) == repr(x)), []).append((x, y))
    order = list(kinds.values())
    rng.shuffle(order)
    tests: list[tuple[Any, Any]] = []
    answers: set[str] = set()
    while len(tests) < min(N_TESTS, len(pool)):
        for cases in order:
            fresh = [c for c in cases if repr(c[1]) not in answers] or cases
            if fresh and len(tests) < N_TESTS:
                case = fresh[0]
                cases.remove(case)
                tests.append(case)
                answers.add(repr(case[1]))
    return example, tests


# Template weights: the seven templates Gemma-3-270M sometimes solves count three times, so that both
# base models start in 20-60% (uniform: Gemma ~17% greedy on a tuning sample).  Greedy on the test split
# (n=400) with these weights: SmolLM2-135M-Instruct 36.5%, Gemma-3-270M 31.5%.
WEIGHTS: dict[str, int] = {name: 3 if name in ("divisible", "list_stat", "map", "predicate", "replace", "scalar",
                                               "str_op") else 1 for name in TEMPLATES}


def make_problem(rng: random.Random) -> tuple[Spec, str, str, str]:
    """``(spec, stub, tests, reference body)`` of one random problem: a template drawn by :data:`WEIGHTS`."""
    names = sorted(TEMPLATES)
    while True:  # a problem whose tests all expect one answer is drawn again (a constant would pass it)
        spec = TEMPLATES[rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]](rng)
        fn = reference(spec)
        example, tests = draw_cases(spec, fn, random.Random(spec.key))  # a problem's cases: its own seed
        if len({repr(y) for _, y in tests}) > 1:
            break
    lines = [f"assert {spec.name}({x!r}) == {y!r}" for x, y in tests]
    return spec, stub_of(spec, *example), "\n".join(lines) + "\n", spec.body


# -- programs from completions ----------------------------------------------------------------

def body_of(completion: str) -> str | None:
    """The function body a completion continues with (its lines up to the first non-blank line that is
    not indented, e.g. a closing fence or a top-level ``print``), or None when it does not start with an
    indented line (it wrote something else: a whole function, prose)."""
    lines = completion.split("\n")
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None or not first[0].isspace():
        return None
    kept = []
    for ln in lines:
        if ln.strip() and not ln[0].isspace():
            break
        kept.append(ln)
    return "\n".join(kept).rstrip() + "\n"


# A base model is shown one solved function before the stub, so that it writes a body (without it,
# Gemma-3-270M wrote "# TODO" comments for many problems).  Not a template's problem.
PLAIN_DEMO = '''def double_evens(xs: list[int]) -> list[int]:
    """Return a list with each even number in xs doubled and each odd number unchanged.

    >>> double_evens([1, 2, 3, 4])
    [1, 4, 3, 8]
    """
    return [x * 2 if x % 2 == 0 else x for x in xs]


'''
ANSWER_START = "```python\n"
INSTRUCTION = "Complete the following Python function. Write the whole function in a ```python code block."


@register_task("pyfunc")
class PyFuncTask(SyntheticTask):
    """Write a short Python function from its signature and docstring; judged by hidden asserts in the sandbox."""

    skill = "code"
    chat = "auto"
    trap_fraction = 0.0
    split_by = "hash"
    sizes = {"train": 2000, "validation": 200, "test": 400}
    max_new_tokens = 96
    # A body ends at a blank line or at top-level text; the stops cut what follows (the verifier cuts too).
    stop = ("\n\n", "\n```", "\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        spec, stub, tests, body = make_problem(rng)
        return stub, tests, {"template": spec.template, "entry_point": spec.name, "completion": body}

    def format_prompt(self, example: Example) -> str:
        return f"{INSTRUCTION}\n\n```python\n{example.prompt}```"

    def prompt_for(self, example: Example, tokenizer=None) -> str:
        if self.chat == "never" or not getattr(tokenizer, "chat_template", None):
            return PLAIN_DEMO + example.prompt  # a base model continues the stub
        return apply_chat_template(self.format_prompt(example), tokenizer, self.chat, self.name) + ANSWER_START

    def reference_completion(self, example: Example) -> str:
        return example.meta["completion"]

    def program(self, completion: str, example: Example) -> str:
        """The program the sandbox runs: the stub and the completion's body, or the completion's own
        function (fenced or bare) after the stub, which it then redefines."""
        text = completion or ""
        body = body_of(text)
        if body is not None:
            return example.prompt + body
        return example.prompt + "\n" + extract_code(text)

    def verify(self, completion: str, example: Example) -> Verdict:
        return self.verify_batch([completion], [example])[0]

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Verdict]:
        programs = [self.program(c, e) for c, e in zip(completions, examples, strict=True)]
        return code_verdicts(programs, [e.answer for e in examples])
