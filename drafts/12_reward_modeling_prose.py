import json, sys
path = sys.argv[1]
nb = json.load(open(path))
cells = nb["cells"]
def src(i): return "".join(cells[i]["source"])
def set_src(i, text): cells[i]["source"] = text.rstrip("\n").splitlines(keepends=True)
def rep(i, old, new):
    s = src(i); assert old in s, (i, old[:60]); set_src(i, s.replace(old, new))

rep(0, """In this chapter: the preference data, the Bradley-Terry model behind the loss, the loss with and
without margin (checked against TRL's formula), a reward model on the SmolLM2-135M trunk (checked
against `transformers`' `LlamaForSequenceClassification`), training it on 411 pairs on a CPU, and
its held-out accuracy overall and per kind of preference.""",
"""In this chapter: the preference data, the Bradley-Terry model behind the loss, the loss with and
without margin (checked against TRL's `RewardTrainer`), a reward model on the SmolLM2-135M trunk
(checked against `transformers`' `LlamaForSequenceClassification`), training it on 327 pairs on a
CPU, and its held-out accuracy per kind of preference, with confidence intervals and over three
seeds, with and without the margin.""")

set_src(2, """## 1. Preference data

`data/preferences/` holds 494 pairs written for this project (327 to train, 167 held out). Each
has a prompt, a `chosen` and a `rejected` answer, a `strength` (1 slightly, 2, 3 clearly better)
and a `kind`: the one signal the pair tests.

* **correctness**: a right answer above a wrong one of exactly the same shape
  (`33 - 28 = 5 passengers.` vs `33 - 28 = 7 passengers.`): only the number or the fact differs;
* **concision**: a direct answer above the same answer padded with hedging and filler;
* **style**: an answer that starts with the answer above one that starts with "Great question!";
* **refusal**: refuse a harmful request, but help with a harmless one that only *sounds* risky.

The held-out pairs test the rules, not memorised strings: their padding, filler openings and
closings, compliance and refusal phrasings, the phrasings of their arithmetic and conversion
questions, and their fact topics never occur in the training pairs (`data/preferences/README.md`
lists them; `tests/test_preference_data.py` checks it).

Length does not solve the held-out pairs as a whole: "prefer the shorter answer" is right on 0.539
of them (printed below), and on every generated arithmetic or conversion pair the two answers
have the same length. Per kind it is different, by construction: the shorter answer wins every
concision pair, and the *longer* answer wins almost every refusal pair (the shorter one wins
0.032 of them): a refusal with a safe alternative is longer than a one-line compliance, and help
is longer than a needless refusal. So a high refusal accuracy alone would not show that a model
reads the request.""")

set_src(6, """The check, internal so far: our loss against a **transcription** of TRL's two lines (our copy of
its formula, so this checks the formula, not TRL's code) and against the package's `reward_loss`
(the package is ours too), on random rewards of all sizes, including differences of ±100 where a
naive `torch.log(torch.sigmoid(z))` gives `inf`. TRL's own `RewardTrainer.compute_loss` comes in
section 3, once there is a model to call it with.""")

rep(8, """The differences are float32 rounding (at loss values near 100, one unit in the last place is
about 1e-5).""", """All three agree to the last bit here (with other operation orders they would differ by float32
rounding: near a loss of 100, one unit in the last place is about 1e-5).""")

rep(20, """The untrained head gives small, arbitrary rewards. From here on we use the package's
`RewardModel`.""", """TRL's `compute_loss` and ours give the same loss and the same gradients for the head and the
last block on the real batch, and agree to float32 rounding on random rewards up to ±100 (printed
above, with TRL's version). The untrained head gives small, arbitrary rewards. From here on we
use the package's `RewardModel`.""")

rep(22, "Conversations are at most 132 tokens, so `max_length = 160` never truncates;",
    "Conversations are at most 129 tokens (printed below), so `max_length = 160` never truncates;")

set_src(26, """Before training, the head is random. Accuracy counts a pair as right when the chosen answer
gets the higher reward; a tie (equal rewards) would count one half, and the number of ties is
printed. The interval is Wilson's 95% score interval for that proportion over the pair count:""")
json.dump(nb, open(path, "w"), indent=1, ensure_ascii=False)
open(path, "a").write("\n")
