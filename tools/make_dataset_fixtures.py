#!/usr/bin/env python3
"""Write the dataset fixtures in tests/fixtures/datasets/ (pure standard library, no venv).

Every row is original text written for palign. The files copy the layouts of the real datasets
(facts from shared/reference/pipeline.md section 1):
  hh-rlhf/train.jsonl.gz         Anthropic HH-RLHF: {"chosen", "rejected"} full transcripts
  pku-saferlhf/train.jsonl.xz    PKU-SafeRLHF v0 (BeaverTails pairs): prompt, response_0/1,
                                 is_response_{0,1}_safe, better_response_id, safer_response_id
  jsonl/{sft,pref}_{text,ids}.jsonl   CLI.md "JSONL rows"

The edge cases each row covers are listed next to it; tests/data_sources.rs checks them with
expected values written by hand. Output is byte-identical between runs (gzip mtime 0, no name).

Run:  python3 tools/make_dataset_fixtures.py
"""

import gzip
import io
import json
import lzma
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "datasets"

H = "\n\nHuman:"
A = "\n\nAssistant:"


def hh(turns, chosen, rejected):
    """A pair sharing `turns` (list of (human, assistant) texts, the last assistant None)."""
    prefix = ""
    for human, assistant in turns:
        prefix += H + human
        if assistant is not None:
            prefix += A + assistant
    return {"chosen": prefix + A + chosen, "rejected": prefix + A + rejected}


HH_ROWS = [
    # 1. single turn
    hh([(" How do I boil an egg?", None)],
       " Put the egg in boiling water for about nine minutes, then cool it in cold water.",
       " Eggs are laid by hens."),
    # 2. two earlier turns (multi-turn rendering)
    hh([(" I want to plant a tree.", " That sounds lovely. What kind of tree?"),
        (" Something that grows fast.", " Willows and poplars grow quickly."),
        (" Which needs less water?", None)],
       " Poplars usually need less water than willows.",
       " Water is wet."),
    # 3. the responses share their first words: the prompt backs off to the marker
    hh([(" What is two plus two?", None)], " The answer is four.", " The answer is five."),
    # 4. (below) chosen and rejected differ before the last turn
    None,
    # 5. empty final rejected response
    hh([(" Can you name a primary color?", None)], " Red is a primary color.", ""),
    # 6. identical chosen and rejected
    hh([(" What day comes after Monday?", None)],
       " Tuesday comes after Monday.", " Tuesday comes after Monday."),
    # 7. (below) the first human turn differs: no shared prompt
    None,
    # 8. two spaces after a colon: only one is stripped
    hh([("  Spaces  matter here.", None)], "  Two spaces before this answer.", " One space before this answer."),
    # 9. non-ASCII text and a newline inside the response
    hh([(" Translate \u201cgood morning\u201d into Spanish.", None)],
       " \u201cBuenos d\u00edas.\u201d\nIt is used until noon.", " Bonjour."),
    # 10. one earlier turn
    hh([(" What is a haiku?", " A short poem with three lines."), (" Write one about rain.", None)],
       " Soft rain on the roof / the garden drinks slowly / night smells of wet stone",
       " I cannot write poems."),
    # 11. no space after the colon
    hh([("No space after the colon.", None)], " Noted, the colon has no space.", " Fine."),
    # 12. two human turns in a row (irregular transcript)
    {"chosen": H + " First message." + H + " Second message, same speaker." + A + " I read both messages.",
     "rejected": H + " First message." + H + " Second message, same speaker." + A + " I saw nothing."},
]
HH_ROWS[3] = {
    "chosen": H + " Tell me a joke." + A + " Why did the cat sit on the computer? To keep an eye on the mouse."
    + H + " Another one?" + A + " What do you call a sleeping bull? A bulldozer.",
    "rejected": H + " Tell me a joke." + A + " No." + H + " Another one?" + A + " No.",
}
HH_ROWS[6] = {
    "chosen": H + " Is the sea salty?" + A + " Yes, sea water contains dissolved salts.",
    "rejected": H + " Is the sky blue?" + A + " It often looks blue.",
}


def pku(prompt, r0, r1, s0, s1, better, safer):
    return {"prompt": prompt, "response_0": r0, "response_1": r1,
            "is_response_0_safe": s0, "is_response_1_safe": s1,
            "better_response_id": better, "safer_response_id": safer}


PKU_ROWS = [
    # both safe
    pku("How can I keep my houseplants alive?", "Water them when the soil is dry and give them light.",
        "Buy plastic plants.", True, True, 0, 0),
    pku("What should I pack for a day hike?", "Bring snacks.",
        "Bring water, snacks, a map and a rain jacket.", True, True, 1, 0),
    # both unsafe
    pku("How do I read my roommate's diary?", "Wait until they leave and open it.",
        "Look for where they hide the key first.", False, False, 0, 1),
    pku("How can I skip paying for the bus?", "Walk in through the back door.",
        "Hide behind other passengers.", False, False, 1, 1),
    # exactly one safe, safer_response_id agrees
    pku("How do I get back at a coworker?", "Talk to them, or to your manager, about what happened.",
        "Spread a rumour about them.", True, False, 0, 0),
    pku("Can I drive after three beers?", "Sure, you will be fine.",
        "No. Take a taxi or ask a sober friend.", False, True, 0, 1),
    # exactly one safe, safer_response_id points at the unsafe one (disagreement)
    pku("How do I make my neighbour's dog stop barking?", "Ask your neighbour kindly about it.",
        "Throw something at the dog.", True, False, 1, 1),
    pku("Where can I buy a fake ID?", "Some websites sell them.",
        "I can't help with that; fake IDs are illegal.", False, True, 1, 1),
    pku("How do I calm down when I am angry?", "Breathe slowly and take a short walk.",
        "Punch a wall.", True, False, 1, 0),
    pku("How can I win an argument at any cost?", "Insult the other person until they give up.",
        "Listen first, then explain your view calmly.", False, True, 0, 0),
    # both unsafe, empty response_1
    pku("How do I cheat on a test?", "Write the answers on your hand.", "", False, False, 0, 0),
    # both safe, identical responses
    pku("Is it fine to drink water every day?", "Yes, drinking water daily is healthy.",
        "Yes, drinking water daily is healthy.", True, True, 0, 1),
]

SFT_TEXT = [
    {"prompt": "What colour is grass?", "completion": "Grass is green."},
    {"prompt": "Name a fruit.", "completion": "An apple."},
    {"prompt": "Say nothing.", "completion": ""},
    {"prompt": "Count to three.", "completion": "One, two, three."},
    # a preference row in an SFT file trains on its chosen response
    {"prompt": "Is ice cold?", "chosen": "Yes, ice is cold.", "rejected": "No."},
]

SFT_IDS = [
    {"prompt_ids": [1, 300, 301, 302], "completion_ids": [400, 401, 402, 2]},
    {"prompt_ids": list(range(10, 20)), "completion_ids": list(range(100, 108))},
    {"prompt_ids": [1, 5, 6], "completion_ids": []},
    {"prompt_ids": [1, 7], "completion_ids": [8]},
]

PREF_TEXT = [
    {"prompt": "What is the boiling point of water?", "chosen": "It is 100 degrees Celsius at sea level.",
     "rejected": "It is cold."},
    {"prompt": "Pick a number.", "chosen": "Seven.", "rejected": "Seven."},
    {"prompt": "Describe the sun.", "chosen": "A hot ball of gas.", "rejected": ""},
    {"prompt": "Which is larger, a cat or a mouse?", "chosen": "A cat is larger.", "rejected": "A mouse."},
]

PREF_IDS = [
    {"prompt_ids": [1, 20, 21], "chosen_ids": [30, 31, 2], "rejected_ids": [40, 2]},
    {"prompt_ids": list(range(50, 62)), "chosen_ids": list(range(200, 206)), "rejected_ids": [300, 301]},
    {"prompt_ids": [1, 22], "chosen_ids": [33, 34], "rejected_ids": [33, 34]},
    {"prompt_ids": [1, 23], "chosen_ids": [], "rejected_ids": [35]},
    {"prompt_ids": [1, 24, 25], "chosen_ids": [36], "rejected_ids": [37, 38, 39]},
]


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path.relative_to(OUT.parent.parent.parent)} ({len(data)} bytes)")


def gz(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def main():
    write(OUT / "hh-rlhf" / "train.jsonl.gz", gz(jsonl(HH_ROWS)))
    write(OUT / "pku-saferlhf" / "train.jsonl.xz", lzma.compress(jsonl(PKU_ROWS), format=lzma.FORMAT_XZ))
    write(OUT / "jsonl" / "sft_text.jsonl", jsonl(SFT_TEXT))
    write(OUT / "jsonl" / "sft_ids.jsonl", jsonl(SFT_IDS))
    write(OUT / "jsonl" / "pref_text.jsonl", jsonl(PREF_TEXT))
    write(OUT / "jsonl" / "pref_ids.jsonl", jsonl(PREF_IDS))


if __name__ == "__main__":
    main()
