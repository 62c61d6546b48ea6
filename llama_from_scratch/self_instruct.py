"""Self-instruct (chapter 9): a model writes new instruction-tuning tasks from a few seed tasks.

Wang et al. (2022), "Self-Instruct: Aligning Language Models with Self-Generated Instructions",
and Stanford Alpaca after them, grew a 175-task seed set into tens of thousands of tasks with a
loop of four steps, each one reproduced here:

1. **Instruction generation.** Show the model ``k`` instructions sampled from the pool (seed
   tasks plus a few already generated ones) as a numbered list ``Task 1: ... Task k:`` and let it
   continue the list; parse the new lines (:func:`encode_prompt`, :func:`parse_instructions`).
2. **Classification task identification.** Is the task a classification with a small set of
   labels? Ask the model a Yes/No question, or use a keyword heuristic
   (:func:`is_classification`).
3. **Instance generation.** For generation tasks the model writes the *input first* and then the
   output; for classification tasks it writes the *output (class label) first* and then an input
   of that class, which stops it from producing inputs that all belong to one label
   (:func:`instance_prompt`, :func:`parse_instance`).
4. **Filtering.** A new instruction is kept only if it passes the post-processing rules of the
   two reference implementations (:func:`filter_instruction`; which rule comes from where is listed
   there): more than 3 and at most 150 words, none of :data:`BLACKLIST`'s words (things a text
   model cannot see or make), not starting "Write a program", not starting with ASCII punctuation
   or a non-ASCII character, and ROUGE-L at most 0.7 with every instruction already in the pool.
   Instances with an empty output are dropped.

:func:`self_instruct` runs rounds of this loop with any text generator: a callable (or an object
with a ``generate`` method) that maps a prompt string to the continuation string. Tests use a
fake deterministic generator; :func:`smollm2_generator` wraps a real model
(:func:`~llama_from_scratch.generation.generate` and its tokenizer), by default SmolLM2-135M.

ROUGE-L (Lin, 2004) is written here from scratch: the longest common subsequence (LCS) of two
token sequences gives ``precision = LCS / len(prediction)``, ``recall = LCS / len(target)`` and
``F = 2 P R / (P + R)``, symmetric in its two arguments. Tokens are those of Google's
``rouge-score`` package (``rouge_score/tokenize.py``, no stemmer), which both Self-Instruct and
Alpaca call: the text is lowercased, every run of characters other than ``a-z`` and ``0-9`` becomes a
space (so punctuation separates words and non-ASCII letters are dropped), and the empty pieces
are discarded (:func:`rouge_tokens`). F is computed with that package's formula and order of
operations, so the scores are the same floating-point numbers; the tests compare them with the
package on random and edge-case strings.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "lcs_length",
    "rouge_l",
    "rouge_l_tokens",
    "rouge_tokens",
    "max_rouge_l",
    "BLACKLIST",
    "CLASSIFICATION_KEYWORDS",
    "load_seed_tasks",
    "encode_prompt",
    "parse_instructions",
    "filter_instruction",
    "is_classification",
    "instance_prompt",
    "parse_instance",
    "smollm2_generator",
    "self_instruct",
]


# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------

def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of two sequences (dynamic programming).

    ``L[i][j]`` = LCS of ``a[:i]`` and ``b[:j]``: ``L[i-1][j-1] + 1`` when ``a[i-1] == b[j-1]``,
    else ``max(L[i-1][j], L[i][j-1])``. Only one previous row is kept: O(len(a) * len(b)) time,
    O(len(b)) memory.
    """
    if len(a) < len(b):
        a, b = b, a  # the shorter one indexes the row
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares, as ``rouge_score``'s default tokenizer (no stemmer) makes them.

    ``text.lower()``, then the maximal runs of ``a-z`` / ``0-9``: ``rouge_score`` replaces every
    other run of characters by a space, splits on whitespace and drops empty tokens, which leaves
    the same list. ``"Sort the words."`` -> ``["sort", "the", "words"]``; ``"2/3"`` -> ``["2", "3"]``;
    ``"Écrivez"`` -> ``["crivez"]`` (non-ASCII letters are not word characters there either).
    """
    if not isinstance(text, str):
        raise TypeError(f"rouge_l compares strings, got {type(text).__name__}")
    return _ROUGE_TOKEN.findall(text.lower())


def _f_measure(lcs: int, len_a: int, len_b: int) -> float:
    # rouge_score's _score_lcs + scoring.fmeasure, with a as the target and b as the prediction
    precision, recall = lcs / len_b, lcs / len_a
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1) of two token sequences; 0.0 if either is empty or they share
    nothing.

    Computed as ``rouge_score`` does (``_score_lcs`` and ``scoring.fmeasure``), with ``a`` as the
    target and ``b`` as the prediction: ``P = LCS / len(b)``, ``R = LCS / len(a)``,
    ``F = 2 * P * R / (P + R)``. Mathematically that is ``2 * LCS / (len(a) + len(b))``; the same
    operations give the same rounding, so the scores equal the package's bit for bit (and the
    result is symmetric: ``2 * P`` is exact and products and sums commute).
    """
    if not a or not b:
        return 0.0
    return _f_measure(lcs_length(a, b), len(a), len(b))


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure (beta = 1) between two strings, on :func:`rouge_tokens`.

    Equals ``rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure``.
    ``rouge_l("the cat sat", "the cat ate")`` is ``2 * 2 / (3 + 3) = 0.667``;
    ``rouge_l("Sort the words.", "sort the words")`` is 1.0 (case and punctuation do not count).
    Symmetric; 0.0 when either string has no tokens (e.g. only punctuation).
    """
    return rouge_l_tokens(rouge_tokens(a), rouge_tokens(b))


def max_rouge_l(text: str, others: Iterable[str]) -> float:
    """The largest :func:`rouge_l` between ``text`` and any of ``others`` (0.0 when there are none).

    A cheap bound skips most LCS computations: the LCS is at most the number of shared tokens
    (multiset intersection), so ``F <= 2 * shared / (m + n)``. The bound is compared in integers
    with the best exact ratio ``2 * LCS / (m + n)`` so far and a pair is skipped only when it is
    strictly below, so the result is exactly ``max(rouge_l(text, o) for o in others)``.
    """
    words = rouge_tokens(text)
    counts = Counter(words)
    best, best_num, best_den = 0.0, 0, 1   # best float score; best exact ratio best_num / best_den
    for other in others:
        ow = rouge_tokens(other)
        if not words or not ow:
            continue
        shared = sum((counts & Counter(ow)).values())
        den = len(words) + len(ow)
        if shared == 0 or 2 * shared * best_den < best_num * den:
            continue
        lcs = lcs_length(words, ow)
        best = max(best, _f_measure(lcs, len(words), len(ow)))
        if 2 * lcs * best_den > best_num * den:
            best_num, best_den = 2 * lcs, den
    return best


# ---------------------------------------------------------------------------------------------
# Seed tasks and prompts
# ---------------------------------------------------------------------------------------------

# Words a generated instruction must not contain (whole words, any case), from the post-processing
# of Self-Instruct (bootstrap_instructions.py: the first 13, up to "go to") and Stanford Alpaca
# (generate_instruction.py, which adds the last 5): things a text-only model cannot see or make.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")

# Words that mark a task with a small, fixed set of answers (the heuristic of is_classification).
CLASSIFICATION_KEYWORDS = ("classify", "classification", "categorize", "categorise", "which category",
                           "sentiment", "spam", "true or false", "yes or no", "fact or opinion",
                           "is this", "is the following", "which language", "positive or negative",
                           "label", "identify whether", "decide whether", "determine whether")

GeneratorFn = Callable[[str], str]


def load_seed_tasks(n: int = 25, seed: int = 0, examples: Sequence[Mapping[str, Any]] | None = None,
                    exclude_categories: Sequence[str] = ("refusal",)) -> list[dict[str, Any]]:
    """``n`` seed tasks from the project's training split (or from ``examples``), spread over the
    categories round-robin, in a seeded random order. Refusals are left out by default: they are
    not tasks to imitate."""
    if examples is None:
        from llama_from_scratch.instruct import load_instructions
        examples = load_instructions("train")
    rng = random.Random(seed)
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        if ex.get("category") not in exclude_categories:
            by_cat.setdefault(ex.get("category", ""), []).append(dict(ex))
    for group in by_cat.values():
        rng.shuffle(group)
    out: list[dict[str, Any]] = []
    cats = sorted(by_cat)
    while len(out) < n and any(by_cat[c] for c in cats):
        for c in cats:
            if by_cat[c] and len(out) < n:
                out.append(by_cat[c].pop())
    return out


def encode_prompt(instructions: Sequence[str]) -> str:
    """The instruction-generation prompt (self-instruct's format): the sampled instructions as
    ``Task 1: ...`` to ``Task k: ...``, then ``Task k+1:`` for the model to continue."""
    if not instructions:
        raise ValueError("encode_prompt needs at least one example instruction")
    lines = ["Come up with a series of new and diverse tasks:"]
    for i, instruction in enumerate(instructions, 1):
        lines.append(f"Task {i}: {' '.join(instruction.split())}")
    lines.append(f"Task {len(instructions) + 1}:")
    return "\n".join(lines)


_TASK_LINE = re.compile(r"^\s*(?:Task\s*)?(\d+)\s*[:.)]\s*(.*)$", re.IGNORECASE)


_DANGLING_TASK = re.compile(r"\s*\bTask\s*\d*\s*:?\s*$")


def parse_instructions(completion: str, start: int | None = None) -> list[str]:
    """New instructions from the model's continuation of :func:`encode_prompt`.

    The continuation starts right after ``Task k+1:`` (so its first line is an instruction without
    a number); later lines look like ``Task 7: ...`` or ``7. ...``. Lines that are not part of a
    numbered item are appended to the current item (an instruction may wrap) until a blank line
    closes it; a trailing bare ``Task`` label (a completion cut off mid-list) is dropped; a line numbered
    out of sequence (the model restarting its list) ends the parse when ``start``, the number of
    the item the completion begins with (``k + 1`` after :func:`encode_prompt`), is given.
    Empty items are dropped; whitespace is normalised.
    """
    items: list[str] = []
    current: list[str] | None = []
    expected = start  # the number of the item being read
    for line in completion.splitlines():
        m = _TASK_LINE.match(line)
        if m:
            if current:
                items.append(" ".join(current))
            number = int(m.group(1))
            if expected is not None and number != expected + 1:
                current = None
                break
            expected = None if expected is None else number
            current = [m.group(2).strip()] if m.group(2).strip() else []
        elif not line.strip():
            # A blank line closes the item: small models ramble on after their list, and what
            # follows a blank line is not part of the instruction.
            if current:
                items.append(" ".join(current))
            current = None
        elif current is not None:
            current.append(line.strip())
    if current:
        items.append(" ".join(current))
    # A completion cut off by max_new_tokens can end with the next item's bare "Task" label.
    cleaned = (_DANGLING_TASK.sub("", " ".join(s.split())) for s in items)
    return [s for s in cleaned if s]


def filter_instruction(instruction: str, existing: Iterable[str] = (), threshold: float = 0.7,
                       min_words: int = 4, max_words: int = 150) -> str | None:
    r"""Why a generated instruction is rejected, or None if it is kept.

    The rules and their order are those of ``post_process_gpt3_response`` in Self-Instruct
    (``self_instruct/bootstrap_instructions.py``, Wang et al. 2022) and Stanford Alpaca
    (``generate_instruction.py``), followed by the ROUGE-L test both run on what survives:

    1. ``"too_short"`` / ``"too_long"``: fewer than ``min_words`` or more than ``max_words``
       whitespace-separated words. Both: ``len(inst.split()) <= 3 or len(inst.split()) > 150``,
       i.e. the defaults ``min_words=4``, ``max_words=150``.
    2. ``"blacklisted"``: contains a word of :data:`BLACKLIST` as a whole word, ignoring case
       (their ``re.search(r"\b(word)\b", inst, re.IGNORECASE)``). Self-Instruct's list is the
       first 13 words; Alpaca's adds video, audio, music, flowchart and diagram; this uses
       Alpaca's.
    3. ``"write_a_program"``: starts with "Write a program". Both have the rule (the model kept
       turning tasks into programming tasks); Self-Instruct compares after ``str.capitalize()``,
       so in any case, as here; Alpaca compares case-sensitively.
    4. ``"starts_with_punctuation"``: the first character is in ``string.punctuation`` (both).
    5. ``"non_ascii_start"``: the first character is not ASCII (both).
    6. ``"too_similar"``: ROUGE-L F (:func:`rouge_l`, ``rouge_score``'s tokens) with some
       instruction of ``existing`` is **above** ``threshold``: both keep an instruction when
       ``max(rouge_scores) > 0.7`` is false, so a score of exactly 0.7 is kept.
       ``"duplicate"`` is reported instead when the rejected instruction equals one of
       ``existing`` ignoring case and spacing; this is only a finer label (the references do not
       separate the two), never a different decision.

    The instruction is whitespace-normalised and stripped first, as Self-Instruct does
    (``re.sub(r"\s+", " ", inst).strip()``). Not reproduced: Self-Instruct also rewrites each kept
    instruction with ``str.capitalize()``; this function only decides.
    """
    text = " ".join(instruction.split())
    words = text.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if any(re.search(rf"\b({re.escape(b)})\b", text, flags=re.IGNORECASE) for b in BLACKLIST):
        return "blacklisted"
    if text.capitalize().startswith("Write a program"):
        return "write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "non_ascii_start"
    existing = list(existing)
    if max_rouge_l(text, existing) > threshold:
        lowered = text.lower()
        if any(lowered == " ".join(e.lower().split()) for e in existing):
            return "duplicate"
        return "too_similar"
    return None


def _heuristic_is_classification(instruction: str) -> bool:
    text = " " + " ".join(instruction.lower().split()) + " "
    return any(k in text for k in CLASSIFICATION_KEYWORDS)


def is_classification(instruction: str, generator: GeneratorFn | None = None) -> bool:
    """Does the task have a small fixed set of possible outputs (a classification task)?

    With a ``generator``, the model is asked (self-instruct's question, zero-shot) and its
    answer read: a first word "yes" or "no". Without one, or when the answer is neither, a
    keyword heuristic decides (:data:`CLASSIFICATION_KEYWORDS`).
    """
    if generator is not None:
        prompt = ("Can the following task be regarded as a classification task with finite output labels? "
                  f"Answer Yes or No.\n\nTask: {instruction}\nIs it classification?")
        answer = _as_text_fn(generator)(prompt).strip().lower()
        first = re.match(r"[a-z]+", answer)
        if first and first.group() in ("yes", "no"):
            return first.group() == "yes"
    return _heuristic_is_classification(instruction)


def instance_prompt(instruction: str, classification: bool, demos: Sequence[Mapping[str, Any]] = ()) -> str:
    """The instance-generation prompt.

    Generation tasks are *input-first* (``Task / Input: / Output:``; an empty input is written
    ``<noinput>``); classification tasks are *output-first* (``Task / Class label: / Input:``), so
    that the model picks a label before writing an input of that class. ``demos`` (examples with
    ``instruction``, ``input``, ``output``) are shown first in the same format.
    """
    if classification:
        head = "Given the classification task, write a class label and then an input of that class."
        fmt = "Task: {instruction}\nClass label: {output}\nInput: {input}"
        tail = f"Task: {instruction}\nClass label:"
    else:
        head = "Come up with an input and the correct output for the task. Write <noinput> if no input is needed."
        fmt = "Task: {instruction}\nInput: {input}\nOutput: {output}"
        tail = f"Task: {instruction}\nInput:"
    parts = [head]
    for d in demos:
        parts.append(fmt.format(instruction=d["instruction"], input=d.get("input") or "<noinput>", output=d["output"]))
    parts.append(tail)
    return "\n\n".join(parts)


def parse_instance(completion: str, classification: bool) -> tuple[str, str] | None:
    """``(input, output)`` from the model's continuation of :func:`instance_prompt`, or None.

    The continuation starts after ``Input:`` (generation) or ``Class label:`` (classification)
    and is cut at the next ``Task:`` or a blank line after the answer. ``<noinput>`` becomes "".
    """
    text = re.split(r"\n\s*Task\s*:", completion, maxsplit=1)[0]
    second = "Input:" if classification else "Output:"
    if second not in text:
        return None
    first_part, second_part = text.split(second, 1)
    second_part = re.split(r"\n\s*\n", second_part.strip(), maxsplit=1)[0]
    first_part, second_part = first_part.strip(), second_part.strip()
    if classification:
        output, inp = first_part, second_part
    else:
        inp, output = first_part, second_part
    if inp.lower() in ("<noinput>", "<no input>", "none", "n/a"):
        inp = ""
    return inp, output


def _as_text_fn(generator: Any) -> GeneratorFn:
    if callable(generator):
        return generator
    method = getattr(generator, "generate", None)
    if callable(method):
        return method
    raise TypeError("generator must be a callable prompt -> text, or have a generate(prompt) -> text method, "
                    f"got {type(generator).__name__}")


def smollm2_generator(model: Any = None, tokenizer: Any = None, max_new_tokens: int = 64, temperature: float = 0.7,
                      top_p: float | None = 0.9, seed: int = 0) -> GeneratorFn:
    """A prompt -> continuation callable around :func:`~llama_from_scratch.generation.generate`.

    ``model`` / ``tokenizer`` default to SmolLM2-135M-Instruct (:func:`~llama_from_scratch.loading.load_smollm2`).
    The prompt is encoded as plain text (no chat template: self-instruct continues a list) and
    the new tokens are decoded, stopping at the tokenizer's EOS. Sampling uses a
    ``torch.Generator`` seeded once with ``seed``, so a run is reproducible.
    """
    import torch

    from llama_from_scratch.generation import generate

    if model is None or tokenizer is None:
        from llama_from_scratch.loading import load_smollm2
        model, tokenizer = load_smollm2()
    device = next(model.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)

    def fn(prompt: str) -> str:
        try:
            ids = tokenizer.encode(prompt, allowed_special="none")
        except TypeError:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        x = torch.tensor([ids], dtype=torch.long, device=device)
        out = generate(model, x, max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_id=tokenizer.eos_token_id, generator=rng)
        new = out[0, x.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        return tokenizer.decode(new)

    return fn


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def self_instruct(generator: Any, seed_tasks: Sequence[Mapping[str, Any]], num_rounds: int = 1,
                  num_prompt_instructions: int = 8, num_machine_instructions: int = 2,
                  similarity_threshold: float = 0.7, classify_with_model: bool = False, num_demos: int = 2,
                  max_output_words: int = 150, max_instructions_per_round: int | None = None,
                  seed: int = 0) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Runs ``num_rounds`` rounds of self-instruct; returns ``(new_tasks, rejected)``.

    Each round: sample ``num_prompt_instructions`` instructions for the prompt (up to
    ``num_machine_instructions`` of them from tasks generated in earlier rounds, the rest from
    ``seed_tasks``), let the model continue the list, parse the new instructions, and for each
    one: filter it (:func:`filter_instruction` against the seed and accepted instructions,
    including those accepted earlier in the same round), decide classification vs generation
    (:func:`is_classification`; the model is asked when ``classify_with_model``), generate an
    instance (:func:`instance_prompt` with ``num_demos`` seed tasks as demonstrations), and keep
    it unless the output is empty, longer than ``max_output_words`` words, or equal to the input.
    ``max_instructions_per_round`` (None: all) caps how many parsed instructions a round examines,
    which bounds the number of model calls (one per examined instruction that passes the filter).

    ``generator`` is a callable ``prompt -> continuation text`` (or an object with such a
    ``generate`` method), e.g. :func:`smollm2_generator`. New tasks are dicts ``{"instruction",
    "input", "output", "is_classification"}``; ``rejected`` counts the reasons instructions or
    instances were dropped (``filter_instruction``'s reasons, plus ``"unparsable_instance"``,
    ``"empty_output"``, ``"output_too_long"``, ``"output_equals_input"``).
    """
    fn = _as_text_fn(generator)
    seeds = [dict(t) for t in seed_tasks]
    if not seeds:
        raise ValueError("self_instruct needs at least one seed task")
    for i, t in enumerate(seeds):
        if not isinstance(t.get("instruction"), str) or not t["instruction"].strip():
            raise ValueError(f"seed task {i} has no instruction: {t!r}")
    if num_prompt_instructions < 1 or num_rounds < 0:
        raise ValueError(f"need num_prompt_instructions >= 1 and num_rounds >= 0, got {num_prompt_instructions}, {num_rounds}")
    if max_instructions_per_round is not None and max_instructions_per_round < 1:
        raise ValueError(f"max_instructions_per_round must be >= 1 or None, got {max_instructions_per_round}")
    rng = random.Random(seed)
    demo_pool = [t for t in seeds if isinstance(t.get("output"), str) and t["output"].strip()]
    pool = [t["instruction"] for t in seeds]
    accepted: list[dict[str, Any]] = []
    rejected: Counter[str] = Counter()
    for _ in range(num_rounds):
        machine = [t["instruction"] for t in accepted]
        n_machine = min(num_machine_instructions, len(machine), num_prompt_instructions)
        n_seed = min(num_prompt_instructions - n_machine, len(seeds))
        prompt_instructions = rng.sample([t["instruction"] for t in seeds], n_seed) + rng.sample(machine, n_machine)
        rng.shuffle(prompt_instructions)
        completion = fn(encode_prompt(prompt_instructions))
        new_instructions = parse_instructions(completion, start=len(prompt_instructions) + 1)
        for instruction in new_instructions[:max_instructions_per_round]:
            reason = filter_instruction(instruction, pool, threshold=similarity_threshold)
            if reason is not None:
                rejected[reason] += 1
                continue
            classification = is_classification(instruction, fn if classify_with_model else None)
            demos = rng.sample(demo_pool, min(num_demos, len(demo_pool)))
            parsed = parse_instance(fn(instance_prompt(instruction, classification, demos)), classification)
            if parsed is None:
                rejected["unparsable_instance"] += 1
                continue
            inp, output = parsed
            if not output:
                rejected["empty_output"] += 1
                continue
            if len(output.split()) > max_output_words:
                rejected["output_too_long"] += 1
                continue
            if inp and inp.strip().lower() == output.strip().lower():
                rejected["output_equals_input"] += 1
                continue
            pool.append(instruction)
            accepted.append({"instruction": instruction, "input": inp, "output": output,
                             "is_classification": classification})
    return accepted, rejected
